"""The in-process engine: builds a chain from a spec and generates with it.

Chain spec: comma-separated level names, drafters from smallest to largest, target last. A name is
a catalog name (`specrouter models`), a local path or a cached HF id, `ngram` (prompt lookup), or
`NAME@skip:L1+L2+A-B` for NAME with those decoder layers skipped (`NAME@skip` picks the default).
A skip level shares NAME's weights. A single name means target-only decoding.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

from specrouter import catalog
from specrouter.chain import Chain, LevelStats, StepContext, speculative_step
from specrouter.levels import Level, ModelLevel, NgramLevel
from specrouter.model import ModelView, load_hf_model
from specrouter.sampling import SamplingParams
from specrouter.sequence import SequenceState
from specrouter.worker import ModelWorker

END_TOKEN_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
DEFAULT_DRAFT_LEN = {"model": 4, "ngram": 4}


@dataclass(frozen=True)
class LevelSpec:
    model: str  # catalog name, path, HF id, or "ngram"
    skip_layers: tuple[int, ...] | None = None  # None: all layers; () after "@skip": the default set
    quant: str | None = None  # "int8" after "@int8"

    @classmethod
    def parse(cls, text: str) -> "LevelSpec":
        model, *modifiers = text.strip().split("@")
        if not model:
            raise ValueError(f"bad level {text!r}: empty model name")
        skip, quant = None, None
        for mod in modifiers:
            if mod == "skip":
                skip = ()
            elif mod.startswith("skip:"):
                skip = _parse_layers(mod[len("skip:") :], text)
            elif mod == "int8":
                quant = "int8"
            else:
                raise ValueError(f"bad level {text!r}: modifiers are @skip, @skip:L1+L2+A-B and @int8")
        return cls(model, skip, quant)

    @property
    def label(self) -> str:
        label = self.model
        if self.skip_layers is not None:
            label += f"@skip:{'+'.join(map(str, self.skip_layers))}"
        return label + (f"@{self.quant}" if self.quant else "")


def _parse_layers(text: str, level: str) -> tuple[int, ...]:
    layers: list[int] = []
    try:
        for part in text.split("+"):
            lo, dash, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise ValueError(f"bad layer list in {level!r}: use e.g. @skip:3+7+10-12") from None
    return tuple(sorted(set(layers)))


def parse_chain(text: str) -> list[LevelSpec]:
    specs = [LevelSpec.parse(part) for part in text.split(",")]
    if specs[-1].model == "ngram" or specs[-1].skip_layers is not None or specs[-1].quant:
        raise ValueError("the target (last level) must be a full model, without @skip or @int8")
    return specs


def default_skip_layers(num_layers: int) -> tuple[int, ...]:
    """For models without a measured set (catalog `default_skip`, from bench/skip_search.py): skip a
    quarter of the layers, every other one from the lower-middle to just before the top two."""
    candidates = list(range(num_layers // 4, num_layers - 2, 2))
    return tuple(candidates[: max(1, num_layers // 4)])


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" (end token) or "length"
    elapsed_s: float
    num_steps: int  # target verifications
    chain: list[str]
    draft_lens: list[int]
    level_stats: list[LevelStats]
    text: str | None = None
    prompt_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "num_target_steps": self.num_steps,
            "tokens_per_target_step": round(len(self.token_ids) / self.num_steps, 3) if self.num_steps else 0.0,
            "chain": self.chain,
            "draft_lens": self.draft_lens,
            "levels": [s.as_dict() for s in self.level_stats],
        }


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
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
            self._loaded[key] = LoadedModel(model, tokenizer)
        return self._loaded[key]


class Engine:
    def __init__(
        self,
        chain: str | list[LevelSpec],
        dtype: str = "float32",
        device: str = "cpu",
        draft_lens: list[int] | None = None,
        num_threads: int | None = None,
        store: ModelStore | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.specs = parse_chain(chain) if isinstance(chain, str) else list(chain)
        if store is not None and (store.dtype, store.device) != (dtype, device):
            raise ValueError("the model store was built for another dtype or device")
        self.store = store or ModelStore(dtype, device)
        target = self.store.get(self.specs[-1].model)
        self.tokenizer = target.tokenizer
        levels = [self._build_level(spec, target.model.lm_head.out_features) for spec in self.specs]
        if draft_lens is None:
            draft_lens = [DEFAULT_DRAFT_LEN["ngram" if s.model == "ngram" else "model"] for s in self.specs[:-1]]
        self.chain = Chain(levels, list(draft_lens))
        self.eos_ids = frozenset(self._end_tokens(target))
        self.max_positions = target.model.config.max_position_embeddings

    def _build_level(self, spec: LevelSpec, target_vocab: int) -> Level:
        if spec.model == "ngram":
            return NgramLevel(target_vocab)
        loaded = self.store.get(spec.model, spec.quant)
        if loaded.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"{spec.model} does not share the target's tokenizer")
        skip = spec.skip_layers
        if skip == ():
            entry = catalog.CATALOG.get(spec.model)
            skip = entry.default_skip if entry and entry.default_skip else default_skip_layers(loaded.model.config.num_hidden_layers)
        skip = skip or ()
        if skip not in loaded.workers:
            label = LevelSpec(spec.model, skip or None, spec.quant).label
            loaded.workers[skip] = ModelWorker(label, ModelView(loaded.model, skip))
        worker = loaded.workers[skip]
        return ModelLevel(worker.name, worker)

    def _end_tokens(self, target: LoadedModel) -> set[int]:
        ids = set()
        tok = target.tokenizer
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        gen_eos = getattr(target.model.generation_config, "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        vocab = tok.get_vocab()
        ids.update(vocab[name] for name in END_TOKEN_NAMES if name in vocab)
        return ids

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        seed: int = 0,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if len(prompt_ids) + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"window of {self.max_positions}"
            )
        seq = SequenceState.new(uuid.uuid4().hex, list(prompt_ids))
        ctx = StepContext(
            params=params,
            generator=torch.Generator().manual_seed(seed),
            eos_ids=frozenset() if ignore_eos else self.eos_ids,
            stats=[LevelStats(name) for name in self.chain.names],
        )
        finish, steps = "length", 0
        t0 = time.perf_counter()
        try:
            while len(seq.generated) < max_new_tokens:
                new = speculative_step(self.chain, seq, ctx, budget=max_new_tokens - len(seq.generated))
                steps += 1
                end = next((i for i, t in enumerate(new) if t in ctx.eos_ids), None)
                if end is not None:
                    seq = seq.commit(new[: end + 1])
                    finish = "stop"
                    break
                seq = seq.commit(new)
        finally:
            for level in self.chain.levels:
                level.release(seq.seq_id)
        return GenerationResult(
            token_ids=list(seq.generated),
            finish_reason=finish,
            elapsed_s=time.perf_counter() - t0,
            num_steps=steps,
            chain=self.chain.names,
            draft_lens=list(self.chain.draft_lens),
            level_stats=ctx.stats,
            prompt_tokens=len(prompt_ids),
        )

    def generate_text(self, prompt: str, max_new_tokens: int, **kwargs) -> GenerationResult:
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        result = self.generate(prompt_ids, max_new_tokens, **kwargs)
        result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return result
