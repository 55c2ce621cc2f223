"""Adaptive routing vs every static chain on a mixed code + chat workload, in one run; then the same
with one drafter artificially slowed down half-way.

    .venv/bin/python bench/adaptive.py [--humaneval 4] [--sharegpt 4] [--max-tokens 96] [--draft-confidence 0.4]

With --draft-confidence, the bottom drafter of every chain (static or routed) ends its block after a
token it gave less than that probability, and a static chain's bottom model drafts blocks of up to 10.

Writes bench/results/adaptive-<timestamp>.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from speculative import machine_info  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.classifier import classify  # noqa: E402
from specrouter.engine import Engine  # noqa: E402
from specrouter.store import ModelStore  # noqa: E402
from specrouter.router import RouterConfig, router_for  # noqa: E402
from specrouter.scheduler import Plan, enumerate_chains  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
POOL = f"ngram,qwen2.5-coder-0.5b@int8,{TARGET}@skip,{TARGET}"
STATIC_LEN = {"ngram": 3}  # block length a level proposes in a static chain; models: 6 to the target, 4 below


class SlowedLevel:
    """Bench-only wrapper: makes every call of a level take `factor` times as long."""

    def __init__(self, level, factor: float):
        self.inner, self.factor = level, factor
        self.name, self.vocab_size, self.can_verify = level.name, level.vocab_size, level.can_verify

    def _slow(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        time.sleep((self.factor - 1) * (time.perf_counter() - t0))
        return out

    def propose(self, *args):
        return self._slow(self.inner.propose, *args)

    def score(self, *args):
        return self._slow(self.inner.score, *args)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def forget(self):
        self.inner.forget()

    def backlog(self, seq_id, num_tokens):
        return self.inner.backlog(seq_id, num_tokens)


def static_plans(engine: Engine, bottom_model_len: int | None = None) -> list[Plan]:
    names = list(engine.levels)
    plans = []
    for chain in enumerate_chains(names[:-1], names[-1], lambda n: engine.levels[n].can_verify):
        lens = tuple(STATIC_LEN.get(n, bottom_model_len if i == 0 and bottom_model_len else 6 if i == len(chain) - 2 else 4)
                     for i, n in enumerate(chain[:-1]))
        plans.append(Plan(chain, lens, 0.0))
    return plans


class FixedRoute:
    """A static chain through the same code path as adaptive routing."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def next_plan(self, backlog=None, remaining=None) -> Plan:
        return self.plan

    def observe(self, records, committed, seconds) -> None:
        pass

    def explain(self) -> dict:
        return {}


def label(plan: Plan) -> str:
    return " -> ".join(n.replace("qwen2.5-coder-", "") for n in plan.chain) + f" {list(plan.draft_lens)}"


def tps(rows: list[dict]) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def slowed_drafter(engine: Engine, encoded: list, statics: list[Plan], static_rows: dict[str, list[dict]], best_static: str,
                   router, args) -> dict:
    """The best static chain, then adaptive routing, over the workload with the best static chain's
    model drafter slowed `args.slow_factor` times from half-way. Also the best any choice of chain
    could do after the slowdown: the slowed chain or the best static chain without the victim (its
    part-1 rows over the same prompts)."""
    best_plan = next(p for p in statics if label(p) == best_static)
    victim = next((n for n in best_plan.chain[:-1] if n != "ngram"), "qwen2.5-coder-0.5b@int8")
    half = len(encoded) // 2

    def run_range(route_fn, lo, hi) -> list[dict]:
        rows = []
        for p, ids in encoded[lo:hi]:
            result = engine.generate(ids, args.max_tokens, route=route_fn(classify(p.text)))
            rows.append({"prompt": p.id, "true_class": p.klass, "tokens": len(result.token_ids), "seconds": result.elapsed_s,
                         "routing": result.routing})
        return rows

    def slowed_run(route_fn) -> list[dict]:
        original = engine.levels[victim]
        rows = run_range(route_fn, 0, half)
        engine.replace_level(victim, SlowedLevel(original, args.slow_factor))
        try:
            return rows + run_range(route_fn, half, len(encoded))
        finally:
            engine.replace_level(victim, original)

    slow_static = slowed_run(lambda k: FixedRoute(best_plan))[half:]
    slow_adaptive = slowed_run(router.start)[half:]
    unaffected = {name: round(tps(rows[half:]), 3) for name, rows in static_rows.items()
                  if victim not in next(p for p in statics if label(p) == name).chain}
    best_after = max([tps(slow_static), *unaffected.values()])
    return {
        "victim": victim,
        "factor": args.slow_factor,
        "best_static_before": best_static,
        "static_tokens_per_s_after_slowdown": round(tps(slow_static), 3),
        "unaffected_static_tokens_per_s_after": unaffected,
        "adaptive_tokens_per_s_after_slowdown": round(tps(slow_adaptive), 3),
        "adaptive_vs_static_after_slowdown": round(tps(slow_adaptive) / tps(slow_static), 3),
        "adaptive_vs_best_chain_after_slowdown": round(tps(slow_adaptive) / best_after, 3),
        "adaptive_chains_after_slowdown": [r["routing"]["steps_by_plan"][:2] for r in slow_adaptive],
        "rows_after_slowdown": {"static": slow_static, "adaptive": slow_adaptive},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--humaneval", type=int, default=4)
    parser.add_argument("--sharegpt", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--draft-confidence", type=float, default=0.0, help="the bottom drafter stops below this confidence")
    parser.add_argument("--explore-margin", type=float, default=RouterConfig.explore_margin, help="RouterConfig.explore_margin")
    parser.add_argument("--chains", default="", help="a subset of static chain labels, separated by ';' (default: all)")
    parser.add_argument("--no-slowdown", action="store_true", help="skip part 2 (the slowed drafter)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    engine = Engine(POOL, provider=ModelStore("bfloat16"), draft_confidence=args.draft_confidence)
    code, chat = humaneval(args.humaneval), sharegpt(args.sharegpt)
    prompts = [p for pair in zip(code, chat) for p in pair] + code[len(chat) :] + chat[len(code) :]  # mixed, interleaved
    encoded = [(p, encode(engine.tokenizer, p)) for p in prompts]
    statics = [p for p in static_plans(engine, 10 if args.draft_confidence else None) if not args.chains or label(p) in args.chains.split(";")]
    router = router_for(engine, RouterConfig(explore_margin=args.explore_margin))
    engine.generate(encoded[0][1], 8, route=router.start("warmup"))

    def run_all(route_fn, desc) -> list[dict]:
        rows = []
        for p, ids in tqdm(encoded, desc=desc, leave=False):
            klass = classify(p.text)
            result = engine.generate(ids, args.max_tokens, route=route_fn(klass))
            rows.append({"prompt": p.id, "true_class": p.klass, "class": klass, "tokens": len(result.token_ids),
                         "seconds": result.elapsed_s, "routing": result.routing})
        return rows

    def summarize(rows) -> dict:
        out = {}
        for klass in ("code", "chat", "all"):
            sel = [r for r in rows if klass == "all" or r["true_class"] == klass]
            out[klass] = round(sum(r["tokens"] for r in sel) / sum(r["seconds"] for r in sel), 3)
        return out

    results: dict[str, dict] = {}
    static_rows: dict[str, list[dict]] = {}
    # 1. Every static chain, then adaptive, over the same mixed workload.
    for plan in tqdm(statics, desc="static chains"):
        static_rows[label(plan)] = run_all(lambda k, plan=plan: FixedRoute(plan), label(plan))
        results[label(plan)] = summarize(static_rows[label(plan)])
    adaptive_rows = run_all(router.start, "adaptive")
    results["adaptive"] = summarize(adaptive_rows)
    pred_err = [abs(r["routing"]["predicted_s_per_token"] - r["routing"]["measured_s_per_token"]) / r["routing"]["measured_s_per_token"]
                for r in adaptive_rows]
    best_static = max((k for k in results if k != "adaptive"), key=lambda k: results[k]["all"])
    print(json.dumps({"tokens_per_s": results, "prediction_error_mean": sum(pred_err) / len(pred_err)}), flush=True)  # part 1

    # 2. The drafter the best static chain relies on slows down half-way through the workload.
    slowdown = None if args.no_slowdown else slowed_drafter(engine, encoded, statics, static_rows, best_static, router, args)

    summary = {
        "tokens_per_s": results,
        "best_static": best_static,
        "adaptive_vs_best_static": {k: round(results["adaptive"][k] / max(results[s][k] for s in results if s != "adaptive"), 3)
                                    for k in ("code", "chat", "all")},
        "prediction_error_mean": round(sum(pred_err) / len(pred_err), 3),
        "prediction_error_max": round(max(pred_err), 3),
        "classifier_accuracy": round(sum(r["class"] == r["true_class"] for r in adaptive_rows) / len(adaptive_rows), 3),
        "slowdown": slowdown,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"adaptive-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "adaptive", "machine": machine_info(), "config": vars(args), "pool": POOL,
                                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                                "summary": summary, "adaptive_rows": adaptive_rows, "static_rows": static_rows,
                                "router_acceptance": router.acceptance.snapshot()}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
