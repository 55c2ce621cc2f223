"""Serve one generation through a running Ray cluster and check where each model ran.

A driver for scripts/multinode.sh and scripts/cluster_local.sh: connects to the cluster at
--address (attaching to the raylet at --node-ip, a node on this host), starts a RouterActor on
--chain with --placement (default: drafters need {"accel_small": 1}, the target {"accel_large": 1}),
runs one greedy generation and the same prompt target-only in this process, and prints one JSON
line: the nodes, where each model's actor runs, both outputs. Exit status 0 only if the outputs are
identical and every actor runs on a node that has the custom resources its placement asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ray

from specrouter.core.spec import LevelSpec, parse_chain

SMALL, LARGE = "accel_small", "accel_large"


def default_placement(chain: str) -> dict[str, dict]:
    """Drafters on the node with {SMALL: 1}, the target (and its slim views) on the one with {LARGE: 1}."""
    specs = parse_chain(chain)
    target = specs[-1].model
    placement = {}
    for spec in specs:
        if spec.model != "ngram":
            big = spec.model == target and spec.quant is None
            placement[LevelSpec(spec.model, None, spec.quant).label] = {"resources": {LARGE if big else SMALL: 1}}
    return placement


def wait_for_nodes(count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count or time.monotonic() > deadline:
            return alive
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the head's GCS address, host:port")
    parser.add_argument("--node-ip", required=True, help="IP of the node on this host the driver attaches to")
    parser.add_argument("--chain", default="smollm2-135m@int8,smollm2-135m")
    parser.add_argument("--placement", type=json.loads, help="JSON: model label -> Placement fields")
    parser.add_argument("--nodes", type=int, default=1, help="wait until this many nodes are alive")
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from specrouter.engine.engine import Engine
    from specrouter.runtime.actors import RouterActor

    placement = args.placement or default_placement(args.chain)
    ray.init(address=args.address, _node_ip_address=args.node_ip, log_to_driver=False)
    try:
        nodes = {
            n["NodeID"]: {"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
            for n in wait_for_nodes(args.nodes, timeout_s=120)
        }
        router = RouterActor.remote(args.chain, dtype=args.dtype, placement=placement)
        placements = ray.get(router.placements.remote(), timeout=600)
        for label, where in placements.items():
            where["ip"] = nodes.get(where["node_id"], {}).get("ip")
        reference = Engine(parse_chain(args.chain)[-1].label, dtype=args.dtype)
        prompt_ids = reference.tokenizer(args.prompt)["input_ids"]
        out = ray.get(router.generate.remote(prompt_ids, args.max_tokens, ignore_eos=True), timeout=600)
        want = reference.generate(prompt_ids, args.max_tokens, ignore_eos=True).token_ids
        ray.kill(router)
    finally:
        ray.shutdown()

    misplaced = [
        label for label, where in placements.items()
        if any(nodes.get(where["node_id"], {}).get("resources", {}).get(r, 0) < amount
               for r, amount in placement.get(label, {}).get("resources", {}).items())
    ]
    report = {
        "nodes": nodes,
        "placement": placement,
        "placements": placements,
        "misplaced": misplaced,
        "token_ids": out["token_ids"],
        "target_only_token_ids": want,
        "identical": out["token_ids"] == want,
        "levels": out["levels"],
    }
    print(json.dumps(report))
    return 0 if report["identical"] and not misplaced else 1


if __name__ == "__main__":
    sys.exit(main())
