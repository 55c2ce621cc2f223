"""Where a chain's workers come from.

A `WorkerProvider` turns a level spec into a worker and describes the target. `ModelStore` is the
in-process provider: it loads each model once (by name and quantisation) and gives every skip set
its own worker over the same weights. The distributed runtime provides remote workers instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from specrouter import catalog
from specrouter.model import ModelView, load_hf_model
from specrouter.spec import LevelSpec, default_skip_layers
from specrouter.vocab import tokenizer_fingerprint
from specrouter.worker import ModelWorker

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
    def target_info(self, name: str) -> TargetInfo: ...

    def worker(self, spec: LevelSpec, target: str): ...

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


def resolve_skip(spec: LevelSpec, num_layers: int) -> tuple[int, ...]:
    """The layers a level skips: none, the given ones, or (for a bare @skip) the measured default."""
    if spec.skip_layers is None:
        return ()
    if spec.skip_layers:
        return spec.skip_layers
    entry = catalog.CATALOG.get(spec.model)
    return entry.default_skip if entry and entry.default_skip else default_skip_layers(num_layers)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    workers: dict[tuple[int, ...], ModelWorker] = field(default_factory=dict)  # by skipped layers


class ModelStore:
    """Loaded models by (name, quantisation), so chains built side by side share weights and workers."""

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        self.dtype, self.device = dtype, device
        self._loaded: dict[tuple[str, str | None], LoadedModel] = {}

    def get(self, name: str, quant: str | None = None) -> LoadedModel:
        key = (name, quant)
        if key not in self._loaded:
            model, tokenizer = load_hf_model(catalog.resolve(name), self.dtype, self.device, quant)
            self._loaded[key] = LoadedModel(model, tokenizer, tokenizer_fingerprint(tokenizer))
        return self._loaded[key]

    def target_info(self, name: str) -> TargetInfo:
        loaded = self.get(name)
        return TargetInfo.of(loaded.model, loaded.tokenizer)

    def tokenizer(self, spec: LevelSpec) -> tuple[object, str]:
        loaded = self.get(spec.model, spec.quant)
        return loaded.tokenizer, loaded.fingerprint

    def worker(self, spec: LevelSpec, target: str) -> ModelWorker:
        loaded = self.get(spec.model, spec.quant)
        skip = resolve_skip(spec, loaded.model.config.num_hidden_layers)
        if skip not in loaded.workers:
            label = LevelSpec(spec.model, skip or None, spec.quant).label
            loaded.workers[skip] = ModelWorker(label, ModelView(loaded.model, skip))
        return loaded.workers[skip]
