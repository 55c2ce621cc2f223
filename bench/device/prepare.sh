#!/usr/bin/env bash
# Prepare the GPU check (bench/gpu_check.py) for a device machine whose python3 has PyTorch with CUDA
# and transformers but no network. What it lacks travels with the working tree, in two git-ignored
# folders to carry: .whl/ (wheels of the packages the check imports that such an image lacks: gguf)
# and .devcache/ (the catalog's Qwen2.5-Coder tokenizer: the check runs random models of the
# catalog's shapes, since the weights are too large to carry). Then run bench/device/gpu_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${SPECROUTER_VENV:-.venv}/bin/python"
GGUF_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
mkdir -p .whl .devcache/models
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "gguf==$GGUF_VERSION"
"$PY" - <<'PY'
from pathlib import Path
from transformers import AutoTokenizer
from specrouter.core import catalog
name = "qwen2.5-coder-1.5b"  # where the check looks for it, with SPECROUTER_CACHE=.devcache
AutoTokenizer.from_pretrained(catalog.prepare_tokenizer(name)).save_pretrained(Path(".devcache/models") / f"{name}.tokenizer")
PY
du -sh .whl .devcache
echo "prepared: carry .whl and .devcache; run bash bench/device/gpu_check.sh on the device machine"
