"""Side-by-side benchmark of SpecRouter chains against target-only decoding and transformers'
assisted generation, on HumanEval (code) and ShareGPT (chat) prompts, in one process and one run.

    .venv/bin/python bench/speculative.py [--humaneval 6] [--sharegpt 4] [--max-tokens 128]

Writes bench/results/speculative-<timestamp>.json and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from report import tokens_per_s, write_result  # noqa: E402
from workloads import Prompt, encode, humaneval, sharegpt  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
DRAFT = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "ours" | "hf" | "hf-assisted"
    chain: str = ""
    draft_lens: tuple[int, ...] = ()
    assistant_quant: str | None = None
    draft_confidence: float = 0.0  # ours: Engine(draft_confidence); transformers: assistant_confidence_threshold
    hf_schedule: tuple[int, str] = (4, "constant")  # transformers' num_assistant_tokens and its schedule


HF_DEFAULTS = {"hf_schedule": (20, "constant"), "draft_confidence": 0.4}  # transformers' defaults for assisted generation


METHODS = [
    Method("target-only (transformers)", "hf"),
    Method("assisted (transformers, 0.5B)", "hf-assisted"),
    Method("assisted (transformers, 0.5B int8)", "hf-assisted", assistant_quant="int8"),
    Method("assisted (transformers defaults, 0.5B int8)", "hf-assisted", assistant_quant="int8", **HF_DEFAULTS),
    Method("target-only", "ours", TARGET),
    Method("ngram -> 1.5B", "ours", f"ngram,{TARGET}", (6,)),
    Method("0.5B -> 1.5B", "ours", f"{DRAFT},{TARGET}", (4,)),
    Method("0.5B int8 -> 1.5B", "ours", f"{DRAFT}@int8,{TARGET}", (6,)),
    Method("0.5B int8 -> 1.5B (stop < 0.4)", "ours", f"{DRAFT}@int8,{TARGET}", (10,), draft_confidence=0.4),
    Method("ngram -> 0.5B int8 -> 1.5B", "ours", f"ngram,{DRAFT}@int8,{TARGET}", (3, 6)),
    Method("ngram -> 0.5B int8 -> 1.5B (stop < 0.4)", "ours", f"ngram,{DRAFT}@int8,{TARGET}", (3, 10), draft_confidence=0.4),
    Method("0.5B int8 -> 1.5B skip -> 1.5B", "ours", f"{DRAFT}@int8,{TARGET}@skip,{TARGET}", (4, 6)),
]
BASELINE = "target-only"


@dataclass
class Row:
    method: str
    klass: str
    prompt_id: str
    prompt_tokens: int
    token_ids: list[int]
    elapsed_s: float
    target_steps: int | None = None
    levels: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s


class Runner:
    def __init__(self, store: ModelStore, eos_ids: list[int]):
        self.store = store
        self.eos_ids = eos_ids
        self.engines: dict[str, Engine] = {}
        self.hf_assistants: dict[str, torch.nn.Module] = {}

    def engine(self, method: Method) -> Engine:
        if method.name not in self.engines:
            self.engines[method.name] = Engine(
                method.chain, draft_lens=list(method.draft_lens) or None, provider=self.store, draft_confidence=method.draft_confidence
            )
        return self.engines[method.name]

    def hf_assistant(self, quant: str | None):
        """The draft model as transformers' assisted generation runs it. Its int8 form is quantised
        projection by projection here: specrouter's int8 levels fuse q/k/v and gate/up for ModelView,
        which transformers' own forward cannot run (it looks for q_proj)."""
        if quant != "int8":
            return self.store.get(DRAFT, quant).model
        if "int8" not in self.hf_assistants:
            import warnings

            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            model = transformers.AutoModelForCausalLM.from_pretrained(catalog.resolve(DRAFT), dtype=torch.float32).eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.hf_assistants["int8"] = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return self.hf_assistants["int8"]

    def run(self, method: Method, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float, int | None, list[dict]]:
        if method.kind == "ours":
            result = self.engine(method).generate(prompt_ids, max_tokens)
            return result.token_ids, result.elapsed_s, result.num_steps, [s.as_dict() for s in result.level_stats]
        target = self.store.get(TARGET).model
        kwargs = {}
        if method.kind == "hf-assisted":
            assistant = self.hf_assistant(method.assistant_quant)
            # (4, "constant", no confidence stop): the best fixed schedule measured here; or transformers' defaults
            assistant.generation_config.num_assistant_tokens, assistant.generation_config.num_assistant_tokens_schedule = method.hf_schedule
            assistant.generation_config.assistant_confidence_threshold = method.draft_confidence
            kwargs["assistant_model"] = assistant
        ids = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0], **kwargs
            )
        elapsed = time.perf_counter() - t0
        tokens = out[0, len(prompt_ids) :].tolist()
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        return (tokens[: end + 1] if end is not None else tokens), elapsed, None, []


def summarize(rows: list[Row], methods: list[Method]) -> dict:
    by = {(r.method, r.prompt_id): r for r in rows}
    summary = {}
    for klass in ("code", "chat", "all"):
        sel = [r for r in rows if klass == "all" or r.klass == klass]
        prompt_ids = sorted({r.prompt_id for r in sel})
        if not prompt_ids:
            continue
        out = {}
        for m in methods:
            mine = [by[(m.name, p)] for p in prompt_ids if (m.name, p) in by]
            base = [by[(BASELINE, p)] for p in prompt_ids]
            tokens, seconds = sum(len(r.token_ids) for r in mine), sum(r.elapsed_s for r in mine)
            entry = {
                "tokens_per_s": round(tokens / seconds, 3),
                "speedup_vs_target_only": round((tokens / seconds) / tokens_per_s(base), 3),
                "mean_per_prompt_speedup": round(sum(r.tokens_per_s / b.tokens_per_s for r, b in zip(mine, base)) / len(mine), 3),
                "exact_match_rate_vs_target_only": round(sum(r.token_ids == b.token_ids for r, b in zip(mine, base)) / len(mine), 3),
                "tokens": tokens,
                "seconds": round(seconds, 2),
            }
            if m.kind == "ours" and mine[0].levels:
                steps = sum(r.target_steps for r in mine)
                entry["tokens_per_target_step"] = round(tokens / steps, 3)
                levels = []
                for li, name in enumerate(x["name"] for x in mine[0].levels):
                    drafted = sum(r.levels[li]["num_draft_tokens"] for r in mine)
                    accepted = sum(r.levels[li]["num_accepted_tokens"] for r in mine)
                    rounds = sum(r.levels[li]["num_rounds"] for r in mine)
                    levels.append({
                        "name": name,
                        "num_draft_tokens": drafted,
                        "num_accepted_tokens": accepted,
                        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                        "mean_accepted_length": round((accepted + rounds) / rounds, 3) if rounds else None,
                        "time_s": round(sum(r.levels[li]["time_s"] for r in mine), 2),
                    })
                entry["levels"] = levels
            out[m.name] = entry
        summary[klass] = out
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [k for k in ("code", "chat", "all") if k in summary]
    names = list(summary[classes[0]])
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(classes)
    for ci, klass in enumerate(classes):
        values = [summary[klass][n]["speedup_vs_target_only"] for n in names]
        bars = ax.bar([i + ci * width for i in range(len(names))], values, width, label=klass)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + width * (len(classes) - 1) / 2 for i in range(len(names))], names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs target-only (ours)")
    ax.set_title("Qwen2.5-Coder-1.5B target, bf16, greedy, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_methods(runner, methods: list[Method], prompts: list[Prompt], encoded: dict, max_tokens: int) -> list[Row]:
    """Warm every method up once, then run every (prompt, method) pair, prompt-major so a machine
    slowdown hits every method alike."""
    for m in methods:
        runner.run(m, encoded[prompts[0].id], 4)
    rows: list[Row] = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="gen")
    for p in prompts:
        for m in methods:
            bar.set_postfix_str(f"{p.id} | {m.name}")
            tokens, elapsed, steps, levels = runner.run(m, encoded[p.id], max_tokens)
            rows.append(Row(m.name, p.klass, p.id, len(encoded[p.id]), tokens, elapsed, steps, levels))
            bar.update()
    bar.close()
    return rows


def bench_args(description: str) -> argparse.ArgumentParser:
    """The options every method-comparison benchmark takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--humaneval", type=int, default=6)
    parser.add_argument("--sharegpt", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="", help="a subset of method names, separated by ';' (target-only always runs)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def run_all(args, all_methods: list[Method], runner_type) -> tuple[list[Method], list[Row], dict, list[int]]:
    """The methods `--methods` names (and the baseline), each run on the benchmark's prompts by a
    `runner_type(store, eos_ids)`: the methods, their rows, the summary by class, the target's end tokens."""
    torch.set_num_threads(args.threads)
    methods = [m for m in all_methods if not args.methods or m.name in args.methods.split(";") or m.name == BASELINE]
    store = ModelStore(args.dtype)
    tokenizer = store.get(TARGET).tokenizer
    eos_ids = sorted(store.target_info(TARGET).eos_ids)
    prompts: list[Prompt] = humaneval(args.humaneval) + sharegpt(args.sharegpt)
    encoded = {p.id: encode(tokenizer, p) for p in prompts}
    rows = run_methods(runner_type(store, eos_ids), methods, prompts, encoded, args.max_tokens)
    return methods, rows, summarize(rows, methods), eos_ids


def main() -> None:
    args = bench_args(__doc__).parse_args()
    methods, rows, summary, eos_ids = run_all(args, METHODS, Runner)
    json_path = write_result("speculative", {
        "config": {**vars(args), "target": TARGET, "draft": DRAFT, "greedy": True, "end_tokens": eos_ids},
        "methods": [m.__dict__ for m in methods],
        "summary": summary,
        "rows": [{**r.__dict__, "tokens_per_s": round(r.tokens_per_s, 3)} for r in rows],
    }, args.out)
    plot(summary, json_path.with_suffix(".png"))
    for klass, table in summary.items():
        print(f"\n== {klass} ==")
        for name, e in table.items():
            print(f"{name:38s} {e['tokens_per_s']:6.2f} tok/s  x{e['speedup_vs_target_only']:.2f}  exact {e['exact_match_rate_vs_target_only']:.2f}")
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
