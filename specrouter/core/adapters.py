"""Task-aligned LoRA adapters: where they are kept, how a level loads one.

`specrouter align --task NAME` trains a LoRA adapter that moves a drafter's token distributions toward
the target's on one task's prompts (specrouter/tasks/align.py) and saves it here, beside the sha256 of
its weights. A level `MODEL+task:NAME` (specrouter/core/spec.py) loads MODEL and merges that adapter
into its weights (peft's `merge_and_unload`), so it drafts at the base model's cost. On llama.cpp
(`MODEL+task:NAME@gguf`) the same adapter is written once as a GGUF LoRA adapter for the base's GGUF
file (`gguf_adapter`) and applied by llama.cpp at run time beside the quantised weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
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


def aligned_tasks(model: str) -> list[str]:
    """The tasks a model has a sealed adapter for (its `MODEL+task:TASK` levels), by name."""
    prefix = f"{base_key(model)}--"
    root = adapters_root()
    found = root.glob(f"{prefix}*") if root.is_dir() else []
    return sorted(p.name[len(prefix):] for p in found if (p / WEIGHTS).exists() and (p / DIGEST).exists())


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


# peft's projection names -> llama.cpp's tensor names
LLAMA_CPP_TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
# llama.cpp's converter reorders the rows of Q and K of "llama" models for its rotary embedding (adjacent
# pairs where transformers rotates the two halves of a head); "qwen2" keeps transformers' layout.
_ROPE_PERMUTED = {"llama": True, "qwen2": False}


def gguf_adapter(path: Path, base_gguf: Path) -> Path:
    """The verified adapter at `path` as a llama.cpp LoRA adapter for the model in `base_gguf`, written
    once beside the adapter and named by its sha256. LoRA A [r, in] and B [out, r] go over as they are
    (llama.cpp scales B A by alpha / r, as peft does); B's Q and K rows follow the base's row order."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    digest = (path / DIGEST).read_text().strip()
    out = path / f"adapter-{digest[:16]}.gguf"
    if out.exists():
        return out
    reader = gguf.GGUFReader(base_gguf)
    arch = reader.fields["general.architecture"].contents()
    if arch not in _ROPE_PERMUTED:
        raise AdapterError(f"{base_gguf.name}: LoRA adapters on llama.cpp cover {sorted(_ROPE_PERMUTED)} models, not {arch!r}")
    heads = {"q_proj": reader.fields[f"{arch}.attention.head_count"].contents(),
             "k_proj": reader.fields[f"{arch}.attention.head_count_kv"].contents()}
    config = json.loads((path / CONFIG).read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError(f"{path}: rsLoRA and DoRA adapters do not map onto llama.cpp's LoRA")
    work = out.with_name(f".{out.name}.{os.getpid()}.work")  # processes on one node may convert it at once
    writer = gguf.GGUFWriter(str(work), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key, tensor in sorted(load_file(path / WEIGHTS).items()):
        match = _PEFT_KEY.search(key)
        if match is None or match[2] not in LLAMA_CPP_TENSORS:
            raise AdapterError(f"{path / WEIGHTS}: {key} has no llama.cpp counterpart")
        layer, proj, half = match.groups()
        weight = tensor.float().numpy()
        if half == "B" and proj in heads and _ROPE_PERMUTED[arch]:
            n = heads[proj]  # [out, r] -> each head's rows from (two halves) to (adjacent pairs)
            weight = weight.reshape(n, 2, weight.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(weight.shape)
        writer.add_tensor(f"blk.{layer}.{LLAMA_CPP_TENSORS[proj]}.weight.lora_{half.lower()}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(work, out)
    return out
