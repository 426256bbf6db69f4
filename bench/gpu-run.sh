#!/usr/bin/env bash
# One unattended run on a borrowed GPU machine (docs/benchmarks.md): install the wheels it lacks from
# .whl/ (see ../README "Benchmarks"), then bench/gpu.py with the given arguments.
#   bench/gpu-run.sh --budget 575 --out "$OUT/results" --run none,blocks,compile,server,cold,unet,max --cold warm
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv || true
exec python3 bench/gpu.py "$@"
