"""Task-aligned LoRA adapters: where they are kept, how a level loads one.

`specrouter align --task NAME` trains a LoRA adapter that moves a drafter's token distributions toward
the target's on one task's prompts (specrouter/tasks/align.py) and saves it here, beside the sha256 of
its weights. A level `MODEL+task:NAME` (specrouter/core/spec.py) loads MODEL and merges that adapter
into its weights (peft's `merge_and_unload`), so it drafts at the base model's cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
DIGEST = "SHA256"  # hex sha256 of WEIGHTS, written when the adapter is saved


class AdapterError(ValueError):
    """An aligned level's adapter is missing or does not match its recorded sha256."""


def adapters_root() -> Path:
    return Path(os.environ.get("SPECROUTER_CACHE", Path.home() / ".cache" / "specrouter")) / "adapters"


def base_key(model: str) -> str:
    """A directory-safe key for a base model: its catalog name, or its path with separators replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")


def adapter_dir(model: str, task: str) -> Path:
    return adapters_root() / f"{base_key(model)}--{task}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def seal(path: Path, meta: dict) -> str:
    """Record the sha256 of a saved adapter's weights and its training summary; return the digest."""
    digest = file_sha256(path / WEIGHTS)
    (path / DIGEST).write_text(digest + "\n")
    (path / "meta.json").write_text(json.dumps({**meta, "sha256": digest}, indent=2))
    return digest


def verified_dir(model: str, task: str) -> Path:
    path = adapter_dir(model, task)
    if not (path / WEIGHTS).exists() or not (path / DIGEST).exists():
        raise AdapterError(f"no adapter for {model}+task:{task} in {path}; train one with "
                           f"`specrouter align --task {task} --drafter {model}`")
    expected, got = (path / DIGEST).read_text().strip(), file_sha256(path / WEIGHTS)
    if got != expected:
        raise AdapterError(f"{path / WEIGHTS}: sha256 {got} does not match the recorded {expected}; retrain it")
    return path


def merge_adapter(model, path: Path):
    """`model` with the LoRA adapter at `path` merged into its weights: a plain transformers model again."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
