#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): Qwen1.5-MoE-A2.7B's shape at full depth,
# random init, bf16, a FLEx client step with bf16 and nf4 experts, plan vs measured peak, tokens/s
# and MFU, into benchmarks/results/gpu-check-<date>.md.
# On the GPU machine (python3 3.12 with CUDA torch, no registry) it first installs the carried
# wheels (scripts/gpu-wheels.sh, run here; carry build/gpu-wheels), never replacing its torch.
# usage: scripts/gpu-check.sh [--dry-run] [--out DIR]
#   --dry-run: the same code on this machine's CPU at cut depth (1 layer), no wheels installed
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
dry=no
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=yes; done
if [ "$dry" = no ]; then
    wheels=${GPU_WHEELS:-build/gpu-wheels}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu-check: no wheels in $wheels: run scripts/gpu-wheels.sh where PyPI is reachable and carry $wheels" >&2
        exit 2
    fi
    python=python3
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" "$wheels"/*.whl
fi
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    exec "$python" -m benchmarks.gpu_check "$@"
