"""Continuous batching under load: concurrency 1, 4 and 16 in one run, three ways to decode the same
requests with the same BatchLoop (specrouter/engine/loop.py):

- target-only: plain batched decoding with the target;
- fixed: speculation with the drafter at a fixed draft length, whatever the batch size;
- specrouter: draft lengths (0 included: no speculation) chosen every step by goodput for the batch.

For each concurrency c, c requests arrive at once; reports total tokens/s (all requests' tokens over
the wall time), per-request latency (submit to finish), the plans used and the identical-output rate
against target-only (bf16 can flip near-ties between batched and unbatched passes).

    .venv/bin/python bench/batching.py [--concurrency 1,4,16] [--max-tokens 128] [--fixed-draft-len 4]

Writes bench/results/batching-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.engine.loop import BatchLoop  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.engine.calibration import calibrate_costs, router_for  # noqa: E402
from specrouter.routing.router import RouterConfig  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402

METHODS = ("target-only", "fixed", "specrouter")


def run_batch(loop: BatchLoop, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts arrive at once; step until done."""
    t0 = time.perf_counter()
    results = loop.run([{"prompt_ids": p, "max_new_tokens": max_tokens} for p in prompts])
    wall = time.perf_counter() - t0
    latencies = [r.elapsed_s for r in results]
    plans = Counter()
    for r in results:
        for entry in r.routing["steps_by_plan"]:
            plans[f"{'->'.join(entry['chain'])} {entry['draft_lens']}"] += entry["steps"]
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 3),
        "latency_mean_s": round(statistics.mean(latencies), 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
        "target_steps": max(r.num_steps for r in results),
        "plans_request_steps": dict(plans),
        "token_ids": [r.token_ids for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b@int8")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--fixed-draft-len", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    store = ModelStore(args.dtype)
    engines = {
        "target-only": Engine(args.target, provider=store),
        "fixed": Engine(f"{args.drafter},{args.target}", draft_lens=[args.fixed_draft_len], provider=store),
    }
    engines["specrouter"] = engines["fixed"]
    tokenizer = engines["target-only"].tokenizer
    n = max(concurrency)
    code, chat = humaneval((n + 1) // 2), sharegpt(n // 2)
    mixed = [p for pair in zip(code, chat) for p in pair] + code[len(chat):]  # code and chat alternating
    prompts = [encode(tokenizer, p) for p in mixed][:n]

    t0 = time.perf_counter()
    router = router_for(engines["specrouter"], RouterConfig(), calibrate=False)
    calibrate_costs(router, engines["specrouter"].levels, batches=tuple(concurrency))
    calibration_s = time.perf_counter() - t0
    loops = {m: BatchLoop(engines[m], router if m == "specrouter" else None) for m in METHODS}
    for loop in loops.values():  # warm-up: touch every code path once
        loop.run([{"prompt_ids": prompts[0], "max_new_tokens": 4}])

    rows = {}
    for c in concurrency:
        for m in METHODS:  # method-minor, so a machine slowdown hits every method alike
            rows[(c, m)] = run_batch(loops[m], prompts[:c], args.max_tokens)
            r = rows[(c, m)]
            print(f"c={c:3d} {m:12s} {r['tokens_per_s']:7.2f} tok/s  latency mean {r['latency_mean_s']:.2f}s  {r['plans_request_steps']}", flush=True)

    summary = {}
    for c in concurrency:
        base = rows[(c, "target-only")]
        summary[str(c)] = {
            m: {
                **{k: v for k, v in rows[(c, m)].items() if k != "token_ids"},
                "speedup_vs_target_only": round(rows[(c, m)]["tokens_per_s"] / base["tokens_per_s"], 3),
                "identical_output_rate_vs_target_only": round(
                    sum(a == b for a, b in zip(rows[(c, m)]["token_ids"], base["token_ids"])) / c, 3),
            }
            for m in METHODS
        }
    json_path = write_result("batching", {
        "config": {**vars(args), "greedy": True, "calibration_s": round(calibration_s, 2)},
        "summary": summary,
        "router_profile_acceptance": router.acceptance.snapshot(),
        "token_ids": {f"{c}|{m}": r["token_ids"] for (c, m), r in rows.items()},
    }, args.out)
    for c, table in summary.items():
        print(f"\n== concurrency {c} ==")
        for m, e in table.items():
            print(f"{m:12s} {e['tokens_per_s']:7.2f} tok/s  x{e['speedup_vs_target_only']:.2f}  "
                  f"latency mean {e['latency_mean_s']:.2f}s  identical {e['identical_output_rate_vs_target_only']:.2f}")
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
