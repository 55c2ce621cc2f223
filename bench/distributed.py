"""Per-token time of the distributed chain (Ray actors + gRPC data plane) vs the in-process engine,
same chain, same prompts, one run; plus data-plane bytes per committed token, and both again with
draft-ahead pipelining (specrouter/core/pipeline.py: the next block drafted while the target verifies).

    .venv/bin/python bench/distributed.py [--chain ...] [--prompts 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.engine.loop import BatchLoop  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.runtime.actors import RouterActor, start_local_ray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", default="qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b")
    parser.add_argument("--draft-lens", default="6")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--actor-env", default=None, help='JSON environment of the model actors, e.g. \'{"OMP_WAIT_POLICY": "PASSIVE"}\'')
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipelined runs")
    args = parser.parse_args()
    draft_lens = [int(x) for x in args.draft_lens.split(",")]
    torch.set_num_threads(2)

    engine = Engine(args.chain, dtype=args.dtype, draft_lens=draft_lens)
    prompts = humaneval(args.prompts - args.prompts // 2) + sharegpt(args.prompts // 2)
    encoded = [encode(engine.tokenizer, p) for p in prompts]

    start_local_ray(num_cpus=6)
    placement = {"*": {"num_cpus": 1, "torch_threads": 2}}
    if args.actor_env:
        placement["*"]["env"] = json.loads(args.actor_env)
    routers = {pipeline: RouterActor.options(num_cpus=0).remote(args.chain, dtype=args.dtype, draft_lens=draft_lens,
                                                                  placement=placement, pipeline=pipeline)
               for pipeline in ([False] if args.no_pipeline else [False, True])}

    # Every way runs each prompt in turn (prompt-major), so a drift of the machine's speed hits them alike;
    # only one computes at a time (the others' processes sit idle).
    ways = {
        "in_process": lambda ids, n: engine.generate(ids, n).as_dict(),
        "distributed": lambda ids, n: ray.get(routers[False].generate.remote(ids, n), timeout=900),
    }
    if not args.no_pipeline:
        ways["in_process_pipelined"] = lambda ids, n: BatchLoop(engine, pipeline=True).run(
            [{"prompt_ids": ids, "max_new_tokens": n}])[0].as_dict()
        ways["distributed_pipelined"] = lambda ids, n: ray.get(routers[True].generate.remote(ids, n), timeout=900)
    for way in ways.values():  # warm-up
        way(encoded[0], 8)
    rows: dict[str, list[dict]] = {name: [] for name in ways}
    for ids in encoded:
        for name, way in ways.items():
            rows[name].append(way(ids, args.max_tokens))
    local_rows, remote = rows["in_process"], rows["distributed"]
    local_pipelined_rows, remote_pipelined = rows.get("in_process_pipelined", []), rows.get("distributed_pipelined", [])

    def s_per_token(rows):
        return sum(r["elapsed_s"] for r in rows) / sum(r["completion_tokens"] for r in rows)

    def by_level(rows):
        """Seconds per committed token spent in each level's calls (remote: including the data plane), and outside them."""
        tokens = sum(r["completion_tokens"] for r in rows)
        out = {}
        for r in rows:
            for level in r["levels"]:
                out[level["name"]] = out.get(level["name"], 0.0) + level["time_s"] / tokens
        out["outside_levels"] = s_per_token(rows) - sum(out.values())
        return {k: round(v, 4) for k, v in out.items()}

    tokens = sum(r["completion_tokens"] for r in remote)
    summary = {
        "in_process_s_per_token": round(s_per_token(local_rows), 4),
        "distributed_s_per_token": round(s_per_token(remote), 4),
        "distributed_over_in_process": round(s_per_token(remote) / s_per_token(local_rows), 3),
        "s_per_token_by_level": {name: by_level(rows[name]) for name in ("in_process", "distributed")},  # pipelined: calls overlap
        "data_plane_bytes_per_token": round(sum(r["data_plane_bytes"] for r in remote) / tokens, 1),
        "identical_outputs": {name: sum(a["token_ids"] == b["token_ids"] for a, b in zip(local_rows, r))
                              for name, r in rows.items() if name != "in_process"},
        "prompts": len(encoded),
    }
    if local_pipelined_rows:
        summary["pipelined_s_per_token"] = {"in_process": round(s_per_token(local_pipelined_rows), 4),
                                            "distributed": round(s_per_token(remote_pipelined), 4)}
        summary["pipelined_over_plain"] = {"in_process": round(s_per_token(local_pipelined_rows) / s_per_token(local_rows), 3),
                                           "distributed": round(s_per_token(remote_pipelined) / s_per_token(remote), 3)}
    out = write_result("distributed", {"config": vars(args), "summary": summary})  # peak RSS: the driver's
    print(json.dumps(summary, indent=1), f"\nwrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
