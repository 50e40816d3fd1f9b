#!/usr/bin/env bash
# MiM pre-training on several machines: run this script once on every node, with the same
# NNODES / RDZV_ENDPOINT / RDZV_ID and each node's own NODE_RANK.
#
#   node 0: NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 NPROC=8 DATALIST=... OUTPUT=... bash Training/launch/pretrain_multi_node.sh
#   node 1: NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 NPROC=8 DATALIST=... OUTPUT=... bash Training/launch/pretrain_multi_node.sh
#
# Environment:
#   NNODES         number of machines (required)
#   NODE_RANK      this machine's index, 0 .. NNODES-1 (required)
#   RDZV_ENDPOINT  HOST:PORT of the rendezvous, normally node 0's address and a free TCP port
#                  reachable from every node (required)
#   RDZV_ID        job id shared by all nodes of one run (default mim_pretrain)
#   NPROC          GPUs per node (default: all visible GPUs)
#   DATALIST       datalist JSON (required); every node must see the same files at the same paths
#   OUTPUT         run folder (required); on shared storage, so that --resume works from any node
#   CONFIG         hyper-parameters (default: Training/configs/mim_base_paper.json)
#   DEVICE         cuda (default) or cpu (gloo backend)
#   PYTHON         interpreter with mimcore installed (default python)
#   CROPS_PER_STEP  crops per optimizer step over all processes (default: the config's
#             effective_batch, 128 for MiM as published); fewer crops scale the learning rate
#             linearly (lr = 2e-4 x crops / 128 for MiM) and mim pretrain prints the rate it chose
#   TORCHRUN       launcher command (default torchrun; "python -m torch.distributed.run" works too)
# NCCL picks the network itself; set NCCL_SOCKET_IFNAME (e.g. eth0) if it chooses the wrong one.
# --accum is set so that batch x accum x NNODES x NPROC = the config's effective_batch.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$HERE/../configs/mim_base_paper.json}"
PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"
DEVICE="${DEVICE:-cuda}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
RDZV_ID="${RDZV_ID:-mim_pretrain}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to HOST:PORT of the rendezvous (node 0)}"
: "${DATALIST:?set DATALIST to a datalist JSON}"
: "${OUTPUT:?set OUTPUT to a run folder}"
ACCUM=()
if [ -n "${CROPS_PER_STEP:-}" ]; then
    PROCS=$((NNODES * NPROC))
    if [ $((CROPS_PER_STEP % PROCS)) -ne 0 ]; then
        echo "CROPS_PER_STEP=$CROPS_PER_STEP is not a multiple of the $PROCS processes" >&2; exit 2
    fi
    ACCUM=(--accum $((CROPS_PER_STEP / PROCS)))
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
set -x
exec $TORCHRUN --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
    -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    --config "$CONFIG" "${ACCUM[@]}" "$@"
