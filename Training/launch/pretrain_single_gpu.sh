#!/usr/bin/env bash
# MiM pre-training on one GPU (or the CPU with DEVICE=cpu), hyper-parameters from a config JSON.
#
#   DATALIST=/data/ct/datalist.json OUTPUT=runs/mim_base bash Training/launch/pretrain_single_gpu.sh [extra mim pretrain args]
#
# Environment:
#   DATALIST  datalist JSON with a 'pretraining' section (required; see configs/datalist_example.json)
#   OUTPUT    run folder: checkpoints, metrics.jsonl, TensorBoard logs (required)
#   CONFIG    hyper-parameters (default: Training/configs/mim_base_paper.json)
#   DEVICE    cuda | cuda:N | cpu (default cuda)
#   PYTHON    interpreter with mimcore installed (default python)
#   CROPS_PER_STEP  crops per optimizer step (default: the config's effective_batch, 128 for MiM as
#             published); fewer crops scale the learning rate linearly (lr = 2e-4 x crops / 128 for
#             MiM) and mim pretrain prints the rate it chose
# Extra arguments are passed on to `mim pretrain` and override the config (e.g. --steps 1000, --resume).
# The config's effective_batch is reached with gradient accumulation (--accum).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/../configs/mim_base_paper.json}"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
: "${DATALIST:?set DATALIST to a datalist JSON}"
: "${OUTPUT:?set OUTPUT to a run folder}"

ACCUM=()
if [ -n "${CROPS_PER_STEP:-}" ]; then
    PROCS=1
    if [ $((CROPS_PER_STEP % PROCS)) -ne 0 ]; then
        echo "CROPS_PER_STEP=$CROPS_PER_STEP is not a multiple of the $PROCS processes" >&2; exit 2
    fi
    ACCUM=(--accum $((CROPS_PER_STEP / PROCS)))
fi

set -x
exec "$PYTHON" -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    --config "$CONFIG" "${ACCUM[@]}" "$@"
