"""Adaptive routing vs every static chain on a mixed code + chat workload, in one run (each prompt
under every way in turn, so the host's drift hits them alike); then the same
with one drafter artificially slowed down half-way (3x, and 10x: enough that the chain best before
is no longer best here). Between the two, adaptive and the best static chain alone, on more prompts
(--head-to-head), for a ratio less at the mercy of the host's noise.

    .venv/bin/python bench/adaptive.py [--humaneval 4] [--sharegpt 4] [--max-tokens 96] [--draft-confidence 0.4] [--slow-factors 3,10]
        [--head-to-head 8]
    .venv/bin/python bench/adaptive.py --draft-confidence 0.4 --max-tokens 64 \
        --pool ngram,smollm2-135m@int8,qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b@skip,qwen2.5-coder-1.5b  # + SmolLM2

With --draft-confidence, every drafting model of every chain (static or routed; at the bottom or in the
middle) ends its block after a token it gave less than that probability, and in a static chain every
model proposes blocks of up to 10.

Writes bench/results/adaptive-<timestamp>.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.routing.classifier import classify  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.engine.calibration import router_for  # noqa: E402
from specrouter.routing.router import Decision, RouterConfig  # noqa: E402
from specrouter.routing.scheduler import Plan, enumerate_chains  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
POOL = f"ngram,qwen2.5-coder-0.5b@int8,{TARGET}@skip,{TARGET}"
POOL_WITH_SMOL = f"ngram,smollm2-135m@int8,qwen2.5-coder-0.5b@int8,{TARGET}@skip,{TARGET}"  # + the cross-tokenizer drafter
STATIC_LEN = {"ngram": 3}  # block length a level proposes in a static chain; models: 6 to the target, 4 below (or a cap)


class SlowedLevel:
    """Bench-only wrapper: makes every call of a level take `factor` times as long."""

    def __init__(self, level, factor: float):
        self.inner, self.factor = level, factor
        self.name, self.vocab_size, self.can_verify, self.max_block = level.name, level.vocab_size, level.can_verify, level.max_block
        self.min_confidence, self.cross_tokenizer, self.vocab = level.min_confidence, level.cross_tokenizer, level.vocab

    def _slow(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        time.sleep((self.factor - 1) * (time.perf_counter() - t0))
        return out

    def propose(self, items):
        return self._slow(self.inner.propose, items)

    def score(self, items):
        return self._slow(self.inner.score, items)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def forget(self):
        self.inner.forget()

    def backlog(self, seq_id, num_tokens):
        return self.inner.backlog(seq_id, num_tokens)


def static_plans(engine: Engine, model_cap: int | None = None) -> list[Plan]:
    """Every chain of the pool with fixed block lengths; `model_cap`: every model's (models that stop
    unsure, whose block length is only a cap)."""
    names = list(engine.levels)
    plans = []
    for chain in enumerate_chains(names[:-1], names[-1], lambda n: engine.levels[n].can_verify):
        lens = tuple(STATIC_LEN.get(n, model_cap or (6 if i == len(chain) - 2 else 4)) for i, n in enumerate(chain[:-1]))
        plans.append(Plan(chain, lens, 0.0))
    return plans


class FixedRouter:
    """A static chain through the same code path as adaptive routing."""

    def __init__(self, plan: Plan):
        self.fixed = plan

    def plan(self, requests, backlog=None, remaining=None) -> Decision:
        return Decision(self.fixed, (self.fixed.draft_lens[-1] if self.fixed.draft_lens else 0,) * len(requests), "static")

    def observe(self, requests, records, timings=(), seconds=None) -> None:
        pass


def label(plan: Plan) -> str:
    return " -> ".join(n.replace("qwen2.5-coder-", "") for n in plan.chain) + f" {list(plan.draft_lens)}"


def tps(rows: list[dict]) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def run_one(engine: Engine, prompt, ids: list[int], route, max_tokens: int) -> dict:
    klass = classify(prompt.text)
    result = engine.generate(ids, max_tokens, router=route(klass), klass=klass)
    return {"prompt": prompt.id, "true_class": prompt.klass, "class": klass, "tokens": len(result.token_ids),
            "seconds": result.elapsed_s, "routing": result.routing}


def run_side_by_side(engine: Engine, encoded: list, routes: dict, max_tokens: int, desc: str, slowed=None) -> dict[str, list[dict]]:
    """Every way in `routes` (name -> class -> router) on each prompt in turn, so that the host's
    drift hits them alike; the order of the ways rotates from prompt to prompt, so that none always
    runs first or right after the slowest. `slowed(i)`: a context in which prompt i runs (the slowdown)."""
    rows: dict[str, list[dict]] = {name: [] for name in routes}
    names = list(routes)
    for i, (p, ids) in enumerate(tqdm(encoded, desc=desc)):
        with slowed(i) if slowed else contextlib.nullcontext():
            for name in names[i % len(names):] + names[: i % len(names)]:
                rows[name].append(run_one(engine, p, ids, routes[name], max_tokens))
    return rows


def tps_by_class(rows: list[dict]) -> dict[str, float]:
    return {klass: round(tps([r for r in rows if klass == "all" or r["true_class"] == klass]), 3) for klass in ("code", "chat", "all")}


def per_prompt_oracle(static_rows: dict[str, list[dict]]) -> list[dict]:
    """Each prompt under whichever static chain ran it fastest: the most any router that picks one chain
    per prompt could reach on this run (a bound a little high, as it also picks each prompt's luckiest run)."""
    return [min(runs, key=lambda r: r["seconds"] / max(r["tokens"], 1)) for runs in zip(*static_rows.values())]


def head_to_head_summary(rows: dict[str, list[dict]], best_static: str) -> dict:
    """Adaptive over the best static chain: on the whole workload and per class (tokens/s), and the
    spread of the ratio from prompt to prompt (same prompt, same tokens: a paired comparison)."""
    static, adaptive = rows[best_static], rows["adaptive"]
    per_prompt = sorted(s["seconds"] / a["seconds"] * a["tokens"] / s["tokens"] for s, a in zip(static, adaptive))
    ours, theirs = tps_by_class(adaptive), tps_by_class(static)
    return {
        "best_static": best_static,
        "prompts": len(static),
        "tokens_per_s": {"adaptive": ours["all"], best_static: theirs["all"]},
        "adaptive_vs_best_static": {k: round(ours[k] / theirs[k], 3) for k in ours},
        "per_prompt_ratio": {"min": round(per_prompt[0], 3), "median": round(per_prompt[len(per_prompt) // 2], 3),
                             "max": round(per_prompt[-1], 3), "wins": sum(r > 1 for r in per_prompt)},
    }


def slowed_drafter(engine: Engine, encoded: list, statics: dict[str, Plan], results: dict[str, dict], best_static: str,
                   router, factor: float, max_tokens: int) -> dict:
    """The best static chain, adaptive routing and every static chain without the victim that beat
    target-only in part 1, side by side over the workload, with the best static chain's model
    drafter slowed `factor` times from half-way. After the slowdown, the best of the static chains
    is what a perfect choice of one chain would get."""
    victim = next((n for n in statics[best_static].chain[:-1] if n != "ngram"), "qwen2.5-coder-0.5b@int8")
    half = len(encoded) // 2
    baseline = results[next(name for name, plan in statics.items() if len(plan.chain) == 1)]["all"]
    unaffected = [name for name, plan in statics.items() if victim not in plan.chain and results[name]["all"] >= baseline]
    routes = {best_static: lambda k: FixedRouter(statics[best_static]), **{n: (lambda k, n=n: FixedRouter(statics[n])) for n in unaffected},
              "adaptive": lambda k: router}

    @contextlib.contextmanager
    def slowed(i: int):
        if i < half:
            yield
            return
        original = engine.levels[victim]
        engine.replace_level(victim, SlowedLevel(original, factor))
        try:
            yield
        finally:
            engine.replace_level(victim, original)

    rows = {name: r[half:] for name, r in run_side_by_side(engine, encoded, routes, max_tokens, f"slowed {factor}x", slowed).items()}
    after = {name: round(tps(r), 3) for name, r in rows.items()}
    best_after = max(v for name, v in after.items() if name != "adaptive")
    return {
        "victim": victim,
        "factor": factor,
        "best_static_before": best_static,
        "tokens_per_s_after_slowdown": after,
        "adaptive_vs_static_after_slowdown": round(after["adaptive"] / after[best_static], 3),
        "adaptive_vs_best_chain_after_slowdown": round(after["adaptive"] / best_after, 3),
        "adaptive_chains_after_slowdown": [r["routing"]["steps_by_plan"][:2] for r in rows["adaptive"]],
        "rows_after_slowdown": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--humaneval", type=int, default=4)
    parser.add_argument("--sharegpt", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--slow-factors", default="3,10", help="part 2 runs once per factor, separated by ','; '' skips it")
    parser.add_argument("--draft-confidence", type=float, default=0.0, help="drafting models end their blocks below this confidence")
    parser.add_argument("--explore-margin", type=float, default=RouterConfig.explore_margin, help="RouterConfig.explore_margin")
    parser.add_argument("--pool", default=POOL, help=f"levels cheapest first, the target last (with SmolLM2: {POOL_WITH_SMOL})")
    parser.add_argument("--chains", default="", help="a subset of static chain labels, separated by ';' (default: all)")
    parser.add_argument("--head-to-head", type=int, default=8,
                        help="then adaptive and the best static chain alone on this many more prompts of each kind (0: skip)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    engine = Engine(args.pool, provider=ModelStore("bfloat16"), draft_confidence=args.draft_confidence)
    code, chat = humaneval(args.humaneval), sharegpt(args.sharegpt)
    prompts = [p for pair in zip(code, chat) for p in pair] + code[len(chat) :] + chat[len(code) :]  # mixed, interleaved
    encoded = [(p, encode(engine.tokenizer, p)) for p in prompts]
    statics = {label(p): p for p in static_plans(engine, 10 if args.draft_confidence else None)
               if not args.chains or label(p) in args.chains.split(";") or len(p.chain) == 1}  # target-only always runs
    router = router_for(engine, RouterConfig(explore_margin=args.explore_margin))
    engine.generate(encoded[0][1], 8, router=router, klass="warmup")

    # 1. Every static chain and adaptive, side by side over the same mixed workload.
    routes = {name: (lambda k, plan=plan: FixedRouter(plan)) for name, plan in statics.items()}
    rows = run_side_by_side(engine, encoded, {**routes, "adaptive": lambda k: router}, args.max_tokens, "prompts")
    results = {name: tps_by_class(r) for name, r in rows.items()}
    adaptive_rows = rows.pop("adaptive")
    static_rows = rows
    pred_err = [abs(r["routing"]["predicted_s_per_token"] - r["routing"]["measured_s_per_token"]) / r["routing"]["measured_s_per_token"]
                for r in adaptive_rows]
    best_static = max((k for k in results if k != "adaptive"), key=lambda k: results[k]["all"])
    oracle = tps_by_class(per_prompt_oracle(static_rows))
    print(json.dumps({"tokens_per_s": results, "prediction_error_mean": sum(pred_err) / len(pred_err)}), flush=True)  # part 1

    # 2. Adaptive and the best static chain alone, on more prompts: the mix's few prompts leave their
    # ratio within the host's noise (one chain's runs differ by up to 16% on a prompt).
    head_to_head, head_to_head_rows = None, None
    if args.head_to_head:
        more = [p for pair in zip(humaneval(args.humaneval + args.head_to_head)[args.humaneval:],
                                  sharegpt(args.sharegpt + args.head_to_head)[args.sharegpt:]) for p in pair]
        head_to_head_rows = run_side_by_side(engine, [(p, encode(engine.tokenizer, p)) for p in more],
                                             {best_static: routes[best_static], "adaptive": lambda k: router}, args.max_tokens, "head to head")
        head_to_head = head_to_head_summary(head_to_head_rows, best_static)
        print(json.dumps(head_to_head), flush=True)

    # 3. The drafter the best static chain relies on slows down half-way through the workload.
    slowdown = [slowed_drafter(engine, encoded, statics, results, best_static, router, float(f), args.max_tokens)
                for f in args.slow_factors.split(",") if f]

    summary = {
        "tokens_per_s": results,
        "best_static": best_static,
        "adaptive_vs_best_static": {k: round(results["adaptive"][k] / max(results[s][k] for s in results if s != "adaptive"), 3)
                                    for k in ("code", "chat", "all")},
        "per_prompt_oracle": {"tokens_per_s": oracle,
                              "vs_best_static": {k: round(oracle[k] / results[best_static][k], 3) for k in oracle},
                              "adaptive_vs_oracle": {k: round(results["adaptive"][k] / oracle[k], 3) for k in oracle}},
        "prediction_error_mean": round(sum(pred_err) / len(pred_err), 3),
        "prediction_error_max": round(max(pred_err), 3),
        "classifier_accuracy": round(sum(r["class"] == r["true_class"] for r in adaptive_rows) / len(adaptive_rows), 3),
        "head_to_head": head_to_head,
        "slowdown": slowdown,
    }
    path = write_result("adaptive", {"config": vars(args), "pool": args.pool, "summary": summary, "adaptive_rows": adaptive_rows,
                                     "static_rows": static_rows, "head_to_head_rows": head_to_head_rows,
                                     "router_acceptance": router.acceptance.snapshot()}, args.out)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
