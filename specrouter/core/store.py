"""Where a chain's workers come from.

A `WorkerProvider` turns a level spec into a worker and describes the target. `ModelStore` is the
in-process provider: it loads each model once (by name and quantisation) and gives every skip set
its own worker over the same weights. The distributed runtime provides remote workers instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from specrouter.core import adapters, catalog
from specrouter.core.model import ModelView, load_hf_model, load_hf_tokenizer
from specrouter.core.spec import LevelSpec, default_skip_layers
from specrouter.core.vocab import tokenizer_fingerprint
from specrouter.core.worker import ModelWorker

END_TOKEN_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class TargetInfo:
    """What the engine needs to know of a target model, read from its configuration: never from the
    modules that compute it (an int8 level wraps its LM head, a remote worker has no modules here)."""

    tokenizer: object
    eos_ids: frozenset[int]
    max_positions: int
    vocab_size: int  # rows of the target's distributions

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer) -> "TargetInfo":
        config = model.config
        return cls(tokenizer, end_tokens(tokenizer, model.generation_config), config.max_position_embeddings,
                   config.vocab_size)


class WorkerProvider(Protocol):
    def target_info(self, name: str, quant: str | None = None) -> TargetInfo: ...

    def worker(self, spec: LevelSpec, target: str):
        """The level's worker; `target` is the target's label (a provider may wait longer for it)."""
        ...

    def tokenizer(self, spec: LevelSpec) -> tuple[object, str]:
        """The level's tokenizer and its fingerprint (levels with another than the target's are translated)."""
        ...


def end_tokens(tokenizer, generation_config) -> frozenset[int]:
    """Every token that ends a generation: the tokenizer's, the generation config's, and the usual
    chat-template end markers (Qwen2.5 emits both <|endoftext|> and <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in END_TOKEN_NAMES if name in vocab)
    return frozenset(ids)


def resolve_skip(spec: LevelSpec, num_layers: Callable[[], int]) -> tuple[int, ...]:
    """The layers a level skips: none, the given ones, or (for a bare @skip) the measured default
    (`num_layers` is asked for only then)."""
    if spec.skip_layers is None:
        return ()
    if spec.skip_layers:
        return spec.skip_layers
    entry = catalog.CATALOG.get(spec.model)
    return entry.default_skip if entry and entry.default_skip else default_skip_layers(num_layers())


@dataclass
class LoadedModel:
    model: object  # a transformers model (torch backend) or a LlamaCppModel
    tokenizer: object
    fingerprint: str
    info: TargetInfo
    num_layers: int
    workers: dict[tuple[int, ...], ModelWorker] = field(default_factory=dict)  # by skipped layers

    def view(self, skip: tuple[int, ...]):
        """The model's compute, minus the skipped layers: what a ModelWorker runs."""
        if isinstance(self.model, torch.nn.Module):
            return ModelView(self.model, skip)
        from specrouter.core.llamacpp import LlamaCppView

        return LlamaCppView(self.model)


def gguf_file(name_or_path: str) -> Path:
    """A llama.cpp level's GGUF: a catalog model's (hash-checked), a .gguf file, or the one in a directory."""
    if name_or_path in catalog.CATALOG:
        return catalog.prepare_gguf(name_or_path)
    if name_or_path.endswith(".gguf"):
        return Path(name_or_path)
    found = sorted(Path(name_or_path).glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"{name_or_path}: a llama.cpp level needs one .gguf file there, found {len(found)}")
    return found[0]


def load_tokenizer(name_or_path: str, quant: str | None = None):
    """A level's tokenizer. A llama.cpp level's comes from its catalog entry's tokenizer (no weights are
    converted), from a .gguf file's header, or from the transformers tokenizer beside its GGUF."""
    from transformers import AutoTokenizer

    if quant != "gguf":
        return load_hf_tokenizer(catalog.resolve(name_or_path))
    if name_or_path in catalog.CATALOG:
        return load_hf_tokenizer(catalog.prepare_tokenizer(name_or_path))
    if name_or_path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(Path(name_or_path).parent, gguf_file=Path(name_or_path).name)
    return load_hf_tokenizer(name_or_path)


class ModelStore:
    """Loaded models by (name, quantisation, aligned task), so chains built side by side share weights and workers.
    `threads` is llama.cpp levels' thread count (default: every core this process may use);
    `kv_cache_tokens` the positions of each llama.cpp level's KV cache, all its sequences together
    (default DEFAULT_KV_TOKENS; torch levels' caches grow per sequence); `share_prefixes` whether a
    llama.cpp level's sequences share the cells of the prompt tokens they begin with alike."""

    def __init__(self, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                 kv_cache_tokens: int | None = None, share_prefixes: bool = True):
        self.dtype, self.device, self.threads, self.kv_cache_tokens = dtype, device, threads, kv_cache_tokens
        self.share_prefixes = share_prefixes
        self._loaded: dict[tuple[str, str | None, str | None], LoadedModel] = {}

    def get(self, name: str, quant: str | None = None, task: str | None = None) -> LoadedModel:
        key = (name, quant, task)
        if key not in self._loaded:
            if quant == "gguf":
                from specrouter.core.llamacpp import DEFAULT_KV_TOKENS, LlamaCppModel

                base = gguf_file(name)
                lora = adapters.gguf_adapter(adapters.verified_dir(name, task), base) if task else None
                model = LlamaCppModel(base, self.threads, self.kv_cache_tokens or DEFAULT_KV_TOKENS, lora=lora,
                                      share_prefixes=self.share_prefixes)
                tokenizer = load_tokenizer(name, quant)
                info = TargetInfo(tokenizer, end_tokens(tokenizer, None) | model.end_ids, model.max_positions, model.vocab_size)
                num_layers = model.num_layers
            else:
                adapter = adapters.verified_dir(name, task) if task else None
                model, tokenizer = load_hf_model(catalog.resolve(name), self.dtype, self.device, quant, adapter)
                info, num_layers = TargetInfo.of(model, tokenizer), model.config.num_hidden_layers
            self._loaded[key] = LoadedModel(model, tokenizer, tokenizer_fingerprint(tokenizer), info, num_layers)
        return self._loaded[key]

    def target_info(self, name: str, quant: str | None = None) -> TargetInfo:
        return self.get(name, quant).info

    def tokenizer(self, spec: LevelSpec) -> tuple[object, str]:
        loaded = self.get(spec.model, spec.quant, spec.task)
        return loaded.tokenizer, loaded.fingerprint

    def worker(self, spec: LevelSpec, target: str) -> ModelWorker:
        loaded = self.get(spec.model, spec.quant, spec.task)
        skip = resolve_skip(spec, lambda: loaded.num_layers)
        if skip not in loaded.workers:
            label = LevelSpec(spec.model, skip or None, spec.quant, spec.task).label
            loaded.workers[skip] = ModelWorker(label, loaded.view(skip))
        return loaded.workers[skip]
