"""Per-token time of the distributed chain (Ray actors + gRPC data plane) vs the in-process engine,
same chain, same prompts, one run; plus data-plane bytes per committed token, and both again with
draft-ahead pipelining (specrouter/pipeline.py: the next block drafted while the target verifies).

    .venv/bin/python bench/distributed.py [--chain ...] [--prompts 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from speculative import machine_info  # noqa: E402
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.batching import BatchLoop  # noqa: E402
from specrouter.engine import Engine  # noqa: E402
from specrouter.runtime import RouterActor, start_local_ray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", default="qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b")
    parser.add_argument("--draft-lens", default="6")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--omp-wait-policy", default=None, help="OMP_WAIT_POLICY of the model actors (default: runtime.ACTOR_ENV)")
    args = parser.parse_args()
    draft_lens = [int(x) for x in args.draft_lens.split(",")]
    torch.set_num_threads(2)

    engine = Engine(args.chain, dtype=args.dtype, draft_lens=draft_lens)
    prompts = humaneval(args.prompts - args.prompts // 2) + sharegpt(args.prompts // 2)
    encoded = [encode(engine.tokenizer, p) for p in prompts]
    engine.generate(encoded[0], 4)
    local = [engine.generate(ids, args.max_tokens) for ids in encoded]
    local_pipelined = [BatchLoop(engine, pipeline=True).run([{"prompt_ids": ids, "max_new_tokens": args.max_tokens}])[0]
                       for ids in encoded]
    del engine
    gc.collect()

    start_local_ray(num_cpus=4)
    placement = {"*": {"num_cpus": 1, "torch_threads": 2}}
    if args.omp_wait_policy:
        placement["*"]["env"] = {"OMP_WAIT_POLICY": args.omp_wait_policy}

    def served(pipeline: bool) -> list[dict]:
        router = RouterActor.options(num_cpus=0).remote(args.chain, dtype=args.dtype, draft_lens=draft_lens, placement=placement,
                                                        pipeline=pipeline)
        ray.get(router.generate.remote(encoded[0], 4), timeout=900)
        rows = [ray.get(router.generate.remote(ids, args.max_tokens), timeout=900) for ids in encoded]
        ray.kill(router)  # its model actors go with it
        time.sleep(5)
        return rows

    remote, remote_pipelined = served(False), served(True)

    def s_per_token(rows):
        return sum(r["elapsed_s"] for r in rows) / sum(r["completion_tokens"] for r in rows)

    local_rows, local_pipelined_rows = [r.as_dict() for r in local], [r.as_dict() for r in local_pipelined]
    tokens = sum(r["completion_tokens"] for r in remote)
    summary = {
        "in_process_s_per_token": round(s_per_token(local_rows), 4),
        "distributed_s_per_token": round(s_per_token(remote), 4),
        "distributed_over_in_process": round(s_per_token(remote) / s_per_token(local_rows), 3),
        "in_process_pipelined_s_per_token": round(s_per_token(local_pipelined_rows), 4),
        "distributed_pipelined_s_per_token": round(s_per_token(remote_pipelined), 4),
        "pipelined_over_plain": {"in_process": round(s_per_token(local_pipelined_rows) / s_per_token(local_rows), 3),
                                 "distributed": round(s_per_token(remote_pipelined) / s_per_token(remote), 3)},
        "data_plane_bytes_per_token": round(sum(r["data_plane_bytes"] for r in remote) / tokens, 1),
        "identical_outputs": {name: sum(a["token_ids"] == b["token_ids"] for a, b in zip(local_rows, rows))
                              for name, rows in (("distributed", remote), ("in_process_pipelined", local_pipelined_rows),
                                                 ("distributed_pipelined", remote_pipelined))},
        "prompts": len(encoded),
    }
    out = Path(__file__).parent / "results" / f"distributed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"benchmark": "distributed", "machine": machine_info(), "config": vars(args), "summary": summary,
                               "driver_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}, indent=1))
    print(json.dumps(summary, indent=1), f"\nwrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
