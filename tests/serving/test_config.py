"""The serving config at the edge, and the deploy/ files that carry it."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from specrouter.serving.config import DEFAULT_CHAIN, ServeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_serve_the_default_chain_on_loopback():
    config = ServeConfig()
    assert config.chain == DEFAULT_CHAIN and config.served_name == "qwen2.5-coder-1.5b"
    assert config.grpc_host == "127.0.0.1"


def test_default_config_names_catalog_models_each_placed_in_an_actor_of_its_own():
    from specrouter.core import catalog
    from specrouter.runtime.actors import Placement, placement_for
    from specrouter.core.spec import parse_chain

    config = ServeConfig()
    specs = parse_chain(config.chain)
    assert all(spec.model in catalog.CATALOG for spec in specs[1:])
    assert [spec.model for spec in specs] == ["ngram", "qwen2.5-coder-1.5b"]
    assert specs[-1].backend == "llama.cpp" and config.served_name == "qwen2.5-coder-1.5b"
    placements = {label: Placement(**place.model_dump()) for label, place in config.placement.items()}
    for spec in specs[1:]:  # the n-gram drafter runs in the router, no actor of its own
        options = placement_for(spec, placements).actor_options()
        assert options["num_cpus"] >= 0 and options["num_gpus"] == 0


def test_placement_is_looked_up_by_label_then_name_then_star():
    from specrouter.runtime.actors import Placement, placement_for
    from specrouter.core.spec import LevelSpec

    placements = {"m@int8": Placement(num_cpus=2), "m": Placement(num_cpus=3), "*": Placement(num_cpus=4)}
    assert placement_for(LevelSpec("m", None, "int8"), placements).num_cpus == 2
    assert placement_for(LevelSpec("m"), placements).num_cpus == 3
    assert placement_for(LevelSpec("other"), placements).num_cpus == 4
    assert placement_for(LevelSpec("other"), {}) == Placement()


@pytest.mark.parametrize("fields", [
    {"chain": "a,,b"},
    {"chain": "x,y", "draft_lens": [1, 2]},
    {"dtype": "int4"},
    {"placement": {"*": {"num_gpus": -1}}},
    {"placement": {"*": {"gpus": 1}}},
    {"unknown": 1},
    {"chain": "ngram:0,x"},
    {"routing": {"lengths": [0, 4]}},
    {"routing": {"lookup_lengths": [8, 32]}},  # past the widest pass the profiler times
])
def test_bad_configs_are_rejected_with_the_field_named(fields):
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(fields)


def test_serve_yaml_is_a_valid_serve_config_whose_args_validate():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "specrouter.serving.serve:build_app"
    assert ServeConfig.model_validate(app.args).chain == DEFAULT_CHAIN
    assert doc["http_options"]["host"] == "127.0.0.1"


def test_rayservice_manifest_places_each_model_on_a_group_that_offers_its_resource():
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config = ServeConfig.model_validate(serve_config["applications"][0]["args"])
    offered = set()
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        offered.update(yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"])))
    for label, place in config.placement.items():
        assert set(place.resources) <= offered, label
        assert place.num_gpus == 1 and place.device == "cuda"


def test_api_keys_come_from_the_config_the_environment_or_a_file_and_never_show(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECROUTER_API_KEY", raising=False)
    assert ServeConfig().api_keys == ()
    assert ServeConfig(api_key="sk-one").api_keys == (b"sk-one",)
    monkeypatch.setenv("SPECROUTER_API_KEY", "sk-env-a, sk-env-b")
    assert ServeConfig().api_keys == (b"sk-env-a", b"sk-env-b")
    assert ServeConfig(api_key=["sk-given"]).api_keys == (b"sk-given",)  # the config's own keys win
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsk-file-a\n\nsk-file-b\n")
    config = ServeConfig(api_key="sk-one", api_key_file=keys)
    assert config.api_keys == (b"sk-one", b"sk-file-a", b"sk-file-b")
    copy = ServeConfig.model_validate(config.model_dump())  # as a Serve replica gets it: no file needed
    assert copy.api_keys == config.api_keys and copy.api_key_file is None
    for text in (repr(config), str(config.model_dump()), config.model_dump_json()):
        assert "sk-one" not in text and "sk-file-a" not in text


@pytest.mark.parametrize("fields", [
    {"api_key": "has space"},
    {"api_key": [""]},
    {"api_key_file": "/no/such/key/file"},
    {"max_waiting_requests": -1},
    {"max_body_bytes": 10},
    {"request_timeout_s": 0},
])
def test_bad_front_door_settings_are_rejected(fields):
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(fields)


def test_a_validation_error_never_echoes_an_api_key():
    with pytest.raises(ValidationError) as err:
        ServeConfig.model_validate({"api_key": "sk-secret-value", "chain": "a,,b"})
    assert "sk-secret-value" not in str(err.value)
    with pytest.raises(ValidationError) as err:
        ServeConfig.model_validate({"api_key": "sk-secret value"})
    assert "sk-secret" not in str(err.value)


def test_the_readme_configuration_reference_is_the_one_generated_from_the_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    readme = (ROOT / "README.md").read_text()
    assert reference.rewrite(readme) == readme, "README.md is stale: run python scripts/config_reference.py"
    for name, field in ServeConfig.model_fields.items():
        assert f"| `{name}` |" in readme and field.description
