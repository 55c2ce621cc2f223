"""cluster/: every `ray up` YAML passes Ray's own validation (nothing is started), the local one
never runs `ray stop`, and the SpecRouter placement config asks for accelerators the cloud cluster
has. The `cluster`-marked test runs scripts/cluster_local.sh end to end: `ray up` over SSH to
loopback addresses, one generation through the cluster, `ray down` (run with `-m cluster`; root)."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from specrouter.runtime.actors import Placement
from specrouter.core.spec import LevelSpec, parse_chain

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_UP_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
PROMPT = "The quick brown fox"


def commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def test_the_cluster_yamls_are_there():
    assert {p.name for p in RAY_UP_YAMLS} == {"aws-heterogeneous.yaml", "local.yaml"}


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_yaml_passes_ray_validation(path):
    validate_config(prepare_config(yaml.safe_load(path.read_text())))


def test_ray_validation_rejects_a_broken_yaml():
    config = yaml.safe_load((CLUSTER / "aws-heterogeneous.yaml").read_text())
    config["available_node_types"]["gpu-small"]["resorces"] = config["available_node_types"]["gpu-small"].pop("resources")
    with pytest.raises(Exception, match="resorces"):
        validate_config(prepare_config(config))


def test_local_cluster_never_runs_ray_stop():
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.5", "worker_ips": ["127.0.0.6"]}
    cmds = commands(config)
    assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert not any(re.search(r"\bray stop\b", cmd) for cmd in cmds), cmds
    assert all("ray_node.sh stop" in cmd for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"])


def test_placement_config_matches_the_cloud_node_types():
    cluster = yaml.safe_load((CLUSTER / "aws-heterogeneous.yaml").read_text())
    config = yaml.safe_load((CLUSTER / "specrouter-aws.yaml").read_text())
    node_types = cluster["available_node_types"]
    offered = {  # accelerator type -> most GPUs one node of that type has
        key.split(":", 1)[1]: node["resources"].get("GPU", 0)
        for node in node_types.values() for key in node["resources"] if key.startswith("accelerator_type:")
    }
    assert offered == {"A10G": 1, "A100": 8}
    labels = {LevelSpec(s.model, None, s.quant).label for s in parse_chain(config["chain"]) if s.model != "ngram"}
    assert set(config["placement"]) == labels
    for label, fields in config["placement"].items():
        place = Placement(**fields)  # exactly Placement's fields
        options = place.actor_options()
        assert options["accelerator_type"] in offered, label
        assert 0 < options["num_gpus"] <= offered[options["accelerator_type"]], label
        assert place.device == "cuda"
    # The drafter on the small GPUs, the target on the large ones.
    assert config["placement"]["qwen2.5-coder-0.5b"]["accelerator_type"] == "A10G"
    assert config["placement"]["qwen2.5-coder-1.5b"]["accelerator_type"] == "A100"


@pytest.mark.cluster
def test_ray_up_over_ssh_serves_a_generation_and_tears_down_only_its_own(tiny_dirs):
    from specrouter.engine.engine import Engine

    draft, target = tiny_dirs["draft"], tiny_dirs["target"]
    placement = {
        draft: {"resources": {"accel_small": 1}, "torch_threads": 1},
        target: {"resources": {"accel_large": 1}, "torch_threads": 1},
    }
    proc = subprocess.run(
        ["bash", "scripts/cluster_local.sh", "all", "--chain", f"{draft},{target}", "--placement", json.dumps(placement),
         "--prompt", PROMPT, "--max-tokens", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"nodes"')))

    assert {n["ip"] for n in report["nodes"].values()} == {"127.0.0.5", "127.0.0.6"}
    assert report["placements"][draft]["ip"] == "127.0.0.5"  # the head: accel_small
    assert report["placements"][target]["ip"] == "127.0.0.6"  # the worker that `ray up` started over SSH
    engine = Engine(target, dtype="float32")
    ids = engine.tokenizer(PROMPT)["input_ids"]
    assert report["token_ids"] == engine.generate(ids, 32, ignore_eos=True).token_ids

    # `ray down` went through the rewritten stop: each node stopped by its own process group (the
    # head's message comes back through `ray down`'s ssh -tt, on stdout).
    output = proc.stdout + proc.stderr
    assert "[ray_node] node-127.0.0.6 stopped" in output and "[ray_node] node-127.0.0.5 stopped" in output
    assert "survived ray down" not in output
    # A Ray node outside the cluster (the script's bystander on 127.0.0.7) outlived the teardown.
    assert "the bystander Ray node (127.0.0.7, not in the cluster) survived the teardown" in proc.stderr
    assert subprocess.run(["pgrep", "-f", "/tmp/srcl/"], capture_output=True).returncode == 1  # nothing of ours left
