#!/usr/bin/env bash
# MiM pre-training on N GPUs of one machine (DistributedDataParallel through torchrun).
#
#   NPROC=4 DATALIST=/data/ct/datalist.json OUTPUT=runs/mim_base bash Training/launch/pretrain_multi_gpu.sh [extra args]
#
# Environment:
#   NPROC     processes = GPUs to use (default: all visible GPUs)
#   DATALIST  datalist JSON with a 'pretraining' section (required)
#   OUTPUT    run folder (required; written by rank 0)
#   CONFIG    hyper-parameters (default: Training/configs/mim_base_paper.json)
#   DEVICE    cuda (default) or cpu (gloo backend; for trying the set-up without GPUs)
#   PYTHON    interpreter with mimcore installed (default python)
#   CROPS_PER_STEP  crops per optimizer step over all processes (default: the config's
#             effective_batch, 128 for MiM as published); fewer crops scale the learning rate
#             linearly (lr = 2e-4 x crops / 128 for MiM) and mim pretrain prints the rate it chose
#   TORCHRUN  launcher command (default torchrun; e.g. "python -m torch.distributed.run" works too)
# Restrict the GPUs with CUDA_VISIBLE_DEVICES. --accum is set so that
# batch x accum x NPROC = the config's effective_batch (same learning rate as on one GPU).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/../configs/mim_base_paper.json}"
PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"
DEVICE="${DEVICE:-cuda}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
: "${DATALIST:?set DATALIST to a datalist JSON}"
: "${OUTPUT:?set OUTPUT to a run folder}"
ACCUM=()
if [ -n "${CROPS_PER_STEP:-}" ]; then
    PROCS=$NPROC
    if [ $((CROPS_PER_STEP % PROCS)) -ne 0 ]; then
        echo "CROPS_PER_STEP=$CROPS_PER_STEP is not a multiple of the $PROCS processes" >&2; exit 2
    fi
    ACCUM=(--accum $((CROPS_PER_STEP / PROCS)))
fi

# one data-loader share of the CPU per process; raise if the machine has many cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
set -x
exec $TORCHRUN --standalone --nproc_per_node "$NPROC" \
    -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    --config "$CONFIG" "${ACCUM[@]}" "$@"
