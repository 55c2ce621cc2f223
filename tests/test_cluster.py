"""cluster/: every `ray up` YAML passes Ray's own validation (nothing is started), the local one
never runs `ray stop`, and the SpecRouter placement config asks for accelerators the cloud cluster
has."""

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from specrouter.runtime import Placement
from specrouter.spec import LevelSpec, parse_chain

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))


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
