"""Placement across Ray nodes: scripts/multinode.sh starts a head and two worker nodes on this
machine whose custom resources stand in for two GPU types; each model's actor must run on the node
its placement asks for, and the output must still be the target's. Run with `-m multinode`.

The driver runs in a subprocess (scripts/cluster_check.py under the script), so it never meets a
local Ray this test session may hold."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from specrouter.engine.engine import Engine

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"


def stopped_process_groups(stderr: str) -> list[int]:
    match = re.search(r"stopped \d+ nodes \(process groups ([\d ]+)\)", stderr)
    assert match, stderr[-3000:]
    return [int(pg) for pg in match.group(1).split()]


@pytest.mark.multinode
def test_each_model_runs_on_the_node_its_placement_asks_for(tiny_dirs):
    draft, target = tiny_dirs["draft"], tiny_dirs["target"]
    placement = {
        draft: {"resources": {"accel_small": 1}, "torch_threads": 1},
        target: {"resources": {"accel_large": 1}, "torch_threads": 1},
    }
    proc = subprocess.run(
        ["bash", "scripts/multinode.sh", "check", "--chain", f"{draft},{target}", "--placement", json.dumps(placement),
         "--prompt", PROMPT, "--max-tokens", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    nodes = {node["ip"]: node for node in report["nodes"].values()}
    assert set(nodes) == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert nodes["127.0.0.3"]["resources"].get("accel_small") == 1
    assert nodes["127.0.0.4"]["resources"].get("accel_large") == 1
    assert report["placements"][draft]["ip"] == "127.0.0.3"
    assert report["placements"][target]["ip"] == "127.0.0.4"
    assert report["placements"][draft]["node_id"] != report["placements"][target]["node_id"]

    engine = Engine(target, dtype="float32")
    ids = engine.tokenizer(PROMPT)["input_ids"]
    assert report["token_ids"] == engine.generate(ids, 32, ignore_eos=True).token_ids
    assert report["levels"][0]["name"] == draft and report["levels"][0]["num_draft_tokens"] > 0

    # Teardown stopped exactly the nodes it started: nothing is left in their process groups.
    groups = stopped_process_groups(proc.stderr)
    assert len(groups) == 3
    for pg in groups:
        assert subprocess.run(["pgrep", "-g", str(pg)], capture_output=True).returncode == 1, f"group {pg} left running"
