#!/usr/bin/env bash
# Every CUDA path of mimcore on one GPU in under 8 minutes, one table at the end
# (Testing/gpu/check_cuda.py says what each row checks).
#   Testing/gpu/check_cuda.sh                      # on a GPU machine (cuda:0)
#   Testing/gpu/check_cuda.sh --device cpu --tiny  # the CPU dry run that `make test` runs
# Uses .venv/bin/python when there is one (make setup), else python3. Options go to check_cuda.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/check_cuda.py" "$@"
