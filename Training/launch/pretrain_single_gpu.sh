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
# Extra arguments are passed on to `mim pretrain` and override the config (e.g. --steps 1000, --resume).
# The config's effective_batch is reached with gradient accumulation (--accum).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/../configs/mim_base_paper.json}"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
: "${DATALIST:?set DATALIST to a datalist JSON}"
: "${OUTPUT:?set OUTPUT to a run folder}"


set -x
exec "$PYTHON" -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    --config "$CONFIG" "$@"
