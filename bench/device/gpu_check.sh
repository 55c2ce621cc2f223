#!/usr/bin/env bash
# The GPU check on a device machine prepared by bench/device/prepare.sh (.whl and .devcache carried):
# its python3 holds PyTorch with CUDA; the carried wheels go to /tmp/site, the random models to /tmp.
# Writes gpu-check-<timestamp>.json to $OUT (default bench/results). Extra arguments go to the check.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" SPECROUTER_CACHE="$PWD/.devcache" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec python3 bench/gpu_check.py --random --random-dir /tmp/gpu-check-models --out "${OUT:-bench/results}" "$@"
