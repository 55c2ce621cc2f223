#!/usr/bin/env bash
# The main job on a fresh machine: set-up with the default model family, then generate with the
# default chain (Qwen2.5-Coder 0.5B int8 drafting for 1.5B in bf16). Extra arguments go to
# `specrouter generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh qwen2.5-coder-0.5b qwen2.5-coder-1.5b
prompt='def quicksort(items: list[int]) -> list[int]:
    """Sort items with quicksort."""
'
exec "${SPECROUTER_VENV:-.venv}/bin/specrouter" generate --prompt "$prompt" --max-tokens 96 "$@"
