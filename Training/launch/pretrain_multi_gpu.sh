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


# one data-loader share of the CPU per process; raise if the machine has many cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
set -x
exec $TORCHRUN --standalone --nproc_per_node "$NPROC" \
    -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    --config "$CONFIG" "$@"
