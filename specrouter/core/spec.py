"""Chain specs: comma-separated level names, drafters from smallest to largest, target last.

A name is a catalog name (`specrouter models`), a local path or a cached HF id, `ngram` (prompt
lookup: continues the latest earlier occurrence of the context's last 4, 3 or 2 tokens), `ngram:N`
(prompt lookup on matches of N tokens or more: drafts less often and is right more often, for targets
whose wide passes are dear), or a model with modifiers: `NAME@skip:L1+L2+A-B` skips those decoder layers (a slim level
sharing NAME's weights; `NAME@skip` picks the measured default), `NAME@int8` runs int8 weights,
`NAME@w8` int8 weights with activations in the model's dtype (a target too), `NAME@w4` the same with
4-bit weights in groups of 32 (CPU),
`NAME@gguf` runs NAME's GGUF file on llama.cpp (a catalog name, a .gguf file, or a directory holding
one .gguf file and a tokenizer). `NAME+task:TASK` is NAME with its LoRA adapter aligned to the target
on task TASK (`specrouter align`; specrouter/core/adapters.py: merged into torch weights, applied by
llama.cpp beside a GGUF's), a drafter of its own; the other modifiers follow it
(`qwen2.5-coder-0.5b+task:code@w8`, `qwen2.5-coder-0.5b+task:code@gguf`). A single name means target-only decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_MATCH = 64  # the longest match `ngram:N` may ask for


@dataclass(frozen=True)
class LevelSpec:
    model: str  # catalog name, path, HF id, or "ngram"
    skip_layers: tuple[int, ...] | None = None  # None: all layers; () after "@skip": the default set
    quant: str | None = None  # "int8", "w8" / "w4" (int8 / int4 weights alone), or "gguf" (the file's own, on llama.cpp)
    task: str | None = None  # the task whose aligned adapter is merged into the model's weights
    min_match: int | None = None  # prompt lookup (`ngram:N`): the fewest tokens a match must span (None: 2)

    @classmethod
    def parse(cls, text: str) -> "LevelSpec":
        head, *modifiers = text.strip().split("@")
        if head.startswith("ngram:"):
            size = head[len("ngram:"):]
            if modifiers or not size.isdigit() or not 1 <= int(size) <= MAX_MATCH:
                raise ValueError(f"bad level {text!r}: ngram:N takes a match length N from 1 to {MAX_MATCH}")
            return cls("ngram", min_match=int(size))
        model, aligned, task = head.partition("+task:")
        if aligned and not TASK_NAME.fullmatch(task):
            raise ValueError(f"bad level {text!r}: a task name is letters, digits, '_', '.' and '-'")
        if not model:
            raise ValueError(f"bad level {text!r}: empty model name")
        skip, quant = None, None
        for mod in modifiers:
            if mod == "skip":
                skip = ()
            elif mod.startswith("skip:"):
                skip = _parse_layers(mod[len("skip:") :], text)
            elif mod in ("int8", "w8", "w4", "gguf"):
                quant = mod
            else:
                raise ValueError(f"bad level {text!r}: modifiers are @skip, @skip:L1+L2+A-B, @int8, @w8, @w4 and @gguf")
        if quant == "gguf" and skip is not None:
            raise ValueError(f"bad level {text!r}: a llama.cpp level (@gguf) runs every layer; @skip needs the torch backend")
        return cls(model, skip, quant, task if aligned else None)

    @property
    def backend(self) -> str:
        return "llama.cpp" if self.quant == "gguf" else "torch"

    @property
    def label(self) -> str:
        if self.min_match is not None:
            return f"ngram:{self.min_match}"
        label = self.model + (f"+task:{self.task}" if self.task else "")
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
    if specs[-1].model == "ngram" or specs[-1].skip_layers is not None or specs[-1].quant == "int8" or specs[-1].task:
        raise ValueError("the target (last level) must be a full model, without @skip, @int8 or +task: "
                         "(@w8, @w4 and @gguf are allowed: the target is then that model)")
    return specs


def slim_spec(text: str, target: LevelSpec) -> LevelSpec | None:
    """The slim verifier of tiered verification (specrouter/core/tiered.py): the target with @skip,
    given in full ("NAME@skip:12+13") or as its modifiers alone ("@skip:12+13"; "@skip": the set the
    catalog measured for this role, else the target's default slim set). A llama.cpp target runs every
    layer: for it "@skip" means none (its medium-confidence tokens go to the target), and a layer set
    is an error."""
    from specrouter.core.catalog import CATALOG

    if target.backend == "llama.cpp":
        if text == "@skip":
            return None
        raise ValueError(f"slim verifier {text!r}: a llama.cpp target ({target.label}) runs every layer and has no "
                         "skip-layer view; tiered verification there runs without one")
    quant = f"@{target.quant}" if target.quant else ""
    spec = LevelSpec.parse(target.model + text + quant if text.startswith("@") else text)
    if spec.model != target.model or spec.skip_layers is None or spec.quant != target.quant:
        raise ValueError(f"slim verifier {text!r}: it must be the target {target.label!r} with @skip (a view over its weights)")
    entry = CATALOG.get(spec.model)
    if spec.skip_layers == () and entry is not None and entry.slim_verifier_skip:
        return LevelSpec(spec.model, entry.slim_verifier_skip, spec.quant)
    return spec


def default_skip_layers(num_layers: int) -> tuple[int, ...]:
    """For models without a measured set (catalog `default_skip`, from bench/skip_search.py): skip a
    quarter of the layers, every other one from the lower-middle to just before the top two."""
    candidates = list(range(num_layers // 4, num_layers - 2, 2))
    return tuple(candidates[: max(1, num_layers // 4)])


def chain_summary(chain: str, bit_exact_block: int | None) -> str:
    """A chain's levels, and how many drafted tokens its target verifies at once (`bit_exact_block`:
    the most it verifies bit-exactly; None: any). At 0 the chain decodes as its target alone."""
    levels = chain.split(",")
    summary = " -> ".join(levels)
    if len(levels) == 1 or bit_exact_block is None:
        return summary
    if bit_exact_block == 0:
        return (f"{summary} (the target verifies no drafted token bit-exactly here, so the chain decodes as it alone; "
                "bit_exact: false verifies whole blocks, equal up to rounding)")
    return f"{summary} (blocks of at most {bit_exact_block} drafted tokens: the most the target verifies bit-exactly)"
