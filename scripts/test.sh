#!/usr/bin/env bash
# The test suite on a fresh machine: set-up, then pytest (extra arguments go to pytest;
# `bash scripts/test.sh -m heavy` runs the tests that need the Qwen2.5-Coder models).
set -euo pipefail
cd "$(dirname "$0")/.."
models=(smollm2-135m)
if [[ " $* " == *" heavy"* ]]; then models+=(qwen2.5-coder-0.5b qwen2.5-coder-1.5b); fi
bash scripts/setup.sh "${models[@]}"
exec "${SPECROUTER_VENV:-.venv}/bin/python" -m pytest "$@"
