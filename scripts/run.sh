#!/usr/bin/env bash
# The main job on a fresh machine: set-up with the default model, then serve the default chain
# (prompt lookup below Qwen2.5-Coder-1.5B's GGUF on llama.cpp) on an embedded local Ray:
# OpenAI-compatible HTTP on http://127.0.0.1:8000/v1, gRPC on 127.0.0.1:9000. Ctrl-C stops it.
# Extra arguments go to `specrouter serve` (e.g. --config deploy/... , --port, --adaptive).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh qwen2.5-coder-1.5b:gguf
exec "${SPECROUTER_VENV:-.venv}/bin/specrouter" serve "$@"
