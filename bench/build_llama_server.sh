#!/usr/bin/env bash
# Build llama.cpp's llama-server, the peer of bench/peers.py, from the llama.cpp source vendored in the
# llama-cpp-python sdist the project pins (so both run the same llama.cpp). Cached outside the
# repository; prints the binary's path. About 8 minutes on 2 cores, once.
#   bash bench/build_llama_server.sh            -> ~/.cache/specrouter/llama.cpp/build/bin/llama-server
set -euo pipefail
VERSION=0.3.36
DEST="${LLAMA_CPP_DIR:-${SPECROUTER_CACHE:-$HOME/.cache/specrouter}/llama.cpp}"
BIN="$DEST/build/bin/llama-server"
if [[ -x $BIN ]]; then echo "$BIN"; exit 0; fi
PY="${SPECROUTER_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$work"/llama_cpp_python-*/vendor/llama.cpp "$DEST"
# The same flags as the llama-cpp-python build of scripts/setup.sh: this CPU's instruction set, less AMX.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX" cmake -S "$DEST" -B "$DEST/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$DEST/build" -j2 --target llama-server >&2
echo "$BIN"
