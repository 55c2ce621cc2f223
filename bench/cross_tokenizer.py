"""Cross-tokenizer chains: SmolLM2-135M (49k vocabulary) drafting for the Qwen2.5-Coder pair (152k),
against same-tokenizer chains, target-only decoding and transformers' universal assisted generation
(which re-tokenises text between the two models), on HumanEval (code) and ShareGPT (chat) prompts,
bf16, greedy, both Qwen end tokens honoured, in one process and one run.

    .venv/bin/python bench/cross_tokenizer.py [--humaneval 6] [--sharegpt 4] [--max-tokens 128]
    .venv/bin/python bench/cross_tokenizer.py --humaneval 1 --sharegpt 0 --max-tokens 8   # smoke test

Writes bench/results/cross-tokenizer-<timestamp>.json and a PNG plot next to it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from speculative import BASELINE, Method, bench_args, plot, run_all  # noqa: E402

from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
DRAFT = "qwen2.5-coder-0.5b"
SMOL = "smollm2-135m"

METHODS = [
    Method(BASELINE, "ours", TARGET),
    Method("universal assisted (transformers, SmolLM2)", "hf-universal"),
    Method("SmolLM2 -> 1.5B", "ours", f"{SMOL},{TARGET}", (5,)),
    Method("SmolLM2 -> 0.5B -> 1.5B", "ours", f"{SMOL},{DRAFT},{TARGET}", (3, 5)),
    Method("SmolLM2 -> 0.5B int8 -> 1.5B", "ours", f"{SMOL},{DRAFT}@int8,{TARGET}", (3, 6)),
    Method("SmolLM2 int8 -> 1.5B", "ours", f"{SMOL}@int8,{TARGET}", (5,)),
    Method("SmolLM2 int8 -> 0.5B -> 1.5B", "ours", f"{SMOL}@int8,{DRAFT},{TARGET}", (3, 5)),
    Method("SmolLM2 int8 -> 0.5B int8 -> 1.5B", "ours", f"{SMOL}@int8,{DRAFT}@int8,{TARGET}", (3, 6)),
    Method("SmolLM2 int8 -> 1.5B (stop < 0.4)", "ours", f"{SMOL}@int8,{TARGET}", (10,), draft_confidence=0.4),
    Method("SmolLM2 int8 -> 1.5B (stop < 0.3)", "ours", f"{SMOL}@int8,{TARGET}", (10,), draft_confidence=0.3),
    # both drafters stop unsure: SmolLM2's blocks, and the blocks the 0.5B passes up (a cap of 10, as a bottom drafter's)
    Method("SmolLM2 int8 -> 0.5B int8 -> 1.5B (stop < 0.4)", "ours", f"{SMOL}@int8,{DRAFT}@int8,{TARGET}", (4, 10), draft_confidence=0.4),
    # the premise: a bf16 0.5B costs far more per token than SmolLM2, and then a three-level chain pays
    Method("SmolLM2 int8 -> 0.5B -> 1.5B (stop < 0.4)", "ours", f"{SMOL}@int8,{DRAFT},{TARGET}", (4, 10), draft_confidence=0.4),
    Method("0.5B -> 1.5B (stop < 0.4)", "ours", f"{DRAFT},{TARGET}", (10,), draft_confidence=0.4),
    Method("0.5B -> 1.5B", "ours", f"{DRAFT},{TARGET}", (4,)),
    Method("0.5B int8 -> 1.5B", "ours", f"{DRAFT}@int8,{TARGET}", (6,)),
    Method("0.5B int8 -> 1.5B (stop < 0.4)", "ours", f"{DRAFT}@int8,{TARGET}", (10,), draft_confidence=0.4),
]


class Runner:
    def __init__(self, store: ModelStore, eos_ids: list[int]):
        self.store = store
        self.eos_ids = eos_ids
        self.engines: dict[str, Engine] = {}

    def engine(self, method: Method) -> Engine:
        if method.name not in self.engines:
            self.engines[method.name] = Engine(method.chain, draft_lens=list(method.draft_lens) or None, provider=self.store,
                                               draft_confidence=method.draft_confidence)
        return self.engines[method.name]

    def run(self, method: Method, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float, int | None, list[dict]]:
        if method.kind == "ours":
            result = self.engine(method).generate(prompt_ids, max_tokens)
            return result.token_ids, result.elapsed_s, result.num_steps, [s.as_dict() for s in result.level_stats]
        target, smol = self.store.get(TARGET), self.store.get(SMOL)
        ids = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.model.generate(
                ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=self.eos_ids,
                pad_token_id=self.eos_ids[0],
                assistant_model=smol.model,
                tokenizer=target.tokenizer,
                assistant_tokenizer=smol.tokenizer,
            )
        elapsed = time.perf_counter() - t0
        tokens = out[0, len(prompt_ids) :].tolist()
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        return (tokens[: end + 1] if end is not None else tokens), elapsed, None, []


def targets(overall: dict) -> list[str]:
    """The issue's two targets on the whole workload: each SmolLM2 -> 1.5B way against universal
    assisted generation (>= 1.3x), and the best three-level chain against the best two-level one."""
    uag = "universal assisted (transformers, SmolLM2)"
    lines = [f"{name} vs universal assisted generation: x{e['tokens_per_s'] / overall[uag]['tokens_per_s']:.2f}"
             for name, e in overall.items() if uag in overall and name.startswith("SmolLM2") and name.count("->") == 1]
    for bf16_middle in (False, True):  # all ways; then only those whose 0.5B runs in bf16 (a costly middle)
        ways = {name: e for name, e in overall.items() if not bf16_middle or ("0.5B" in name and "0.5B int8" not in name)}
        chains = {levels: max(((e["tokens_per_s"], name) for name, e in ways.items() if name.count("->") == levels), default=None)
                  for levels in (1, 2)}
        if chains[1] and chains[2]:
            (two, two_name), (three, three_name) = chains[1], chains[2]
            where = " (0.5B in bf16)" if bf16_middle else ""
            lines.append(f"best three-level{where} {three_name!r} vs best two-level{where} {two_name!r}: x{three / two:.2f}")
    return lines


def main() -> None:
    args = bench_args(__doc__).parse_args()

    methods, rows, summary, eos_ids = run_all(args, METHODS, Runner)
    vocab_maps = {level["name"]: level["vocab_map"] for r in rows for level in r.levels if "vocab_map" in level}
    lines = targets(summary.get("all", {}))
    json_path = write_result("cross-tokenizer", {
        "config": {**vars(args), "target": TARGET, "drafts": [SMOL, DRAFT], "greedy": True, "end_tokens": eos_ids},
        "methods": [m.__dict__ for m in methods],
        "vocab_maps": vocab_maps,
        "summary": summary,
        "targets": lines,
        "rows": [{**r.__dict__, "tokens_per_s": round(r.tokens_per_s, 3)} for r in rows],
    }, args.out)
    plot(summary, json_path.with_suffix(".png"))
    for klass, table in summary.items():
        print(f"\n== {klass} ==")
        for name, e in table.items():
            print(f"{name:44s} {e['tokens_per_s']:6.2f} tok/s  x{e['speedup_vs_target_only']:.2f}  exact {e['exact_match_rate_vs_target_only']:.2f}")
    for line in lines:
        print(line)
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
