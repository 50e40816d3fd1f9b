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
WORLD=1

# config JSON -> one `mim pretrain` argument per line (--accum from effective_batch / (batch x WORLD))
CFG_TEXT="$("$PYTHON" -c '
import json, sys
cfg = json.load(open(sys.argv[1])); world = int(sys.argv[2])
a = dict(cfg["args"])
eff = cfg.get("effective_batch")
if eff:
    per = int(a.get("batch", 1)) * world
    if eff % per:
        sys.exit(f"effective_batch {eff} is not a multiple of batch x processes = {per}")
    a["accum"] = eff // per
for k, v in a.items():
    if v is None or v is False:
        continue
    print("--" + k)
    if v is True:
        continue
    for x in (v if isinstance(v, list) else [v]):
        print(json.dumps(x) if isinstance(x, dict) else x)
' "$CONFIG" "$WORLD")"
mapfile -t CFG_ARGS <<< "$CFG_TEXT"

set -x
exec "$PYTHON" -m mimcore pretrain --datalist "$DATALIST" --output "$OUTPUT" --device "$DEVICE" \
    "${CFG_ARGS[@]}" "$@"
