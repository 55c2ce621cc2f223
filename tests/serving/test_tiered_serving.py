"""Tiered (lossy) verification served: opt-in per request, named in every response, bad thresholds refused."""

import json
import urllib.error
import urllib.request

import pytest

from specrouter.serving import client as sdk
from specrouter.serving import openai_protocol as oai
from specrouter.serving.config import ServeConfig
from specrouter.serving.server import SpecRouterServer

PROMPT = "The quick brown fox"


def post(live_server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(live_server["http"] + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_tiered_response_is_flagged_lossy_with_tier_counts(live_server):
    body = {"model": live_server["model"], "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, lossless = post(live_server, body)
    assert status == 200 and "lossy" not in lossless and lossless["specrouter"][0]["lossy"] is False
    status, lossy = post(live_server, {**body, "tiered": {"tau_high": 0.0, "tau_low": 0.0}})
    assert status == 200 and lossy["lossy"] is True
    stats = lossy["specrouter"][0]
    assert stats["lossy"] is True and stats["verification"] == "tiered"
    assert stats["tiers"] == {"tier1_tokens": 12, "tier2_tokens": 0, "tier3_tokens": 0, "slim_rejections": 0}
    status, same = post(live_server, {**body, "tiered": {"tau_high": 1.0, "tau_low": 1.0}})  # tau = 1: lossless
    assert status == 200 and same["choices"][0]["text"] == lossless["choices"][0]["text"] and "lossy" not in same


def test_http_quality_budget_is_lossy_names_its_budget_and_starts_lossless(live_server):
    body = {"model": live_server["model"], "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, budget = post(live_server, {**body, "tiered": {"max_disagreement": 0.05}})
    assert status == 200 and budget["lossy"] is True
    stats = budget["specrouter"][0]
    assert stats["verification"] == "tiered" and stats["max_disagreement"] == 0.05
    assert stats["tiers"]["tier1_tokens"] + stats["tiers"]["tier2_tokens"] + stats["tiers"]["tier3_tokens"] == 8
    status, both = post(live_server, {**body, "tiered": {"tau_high": 0.9, "tau_low": 0.9, "max_disagreement": 0.05}})
    assert status == 400 and both["error"]["param"] == "tiered" and "not both" in both["error"]["message"]


def test_http_bad_thresholds_are_a_400_in_openais_shape(live_server):
    status, body = post(live_server, {"model": live_server["model"], "prompt": PROMPT, "tiered": {"tau_high": 0.3, "tau_low": 0.6}})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "tiered"
    assert "tau_low must be <= tau_high" in body["error"]["message"]


def test_grpc_tiered_response_is_flagged_lossy_and_bad_thresholds_are_invalid_argument(live_server):
    with sdk.Client(live_server["grpc"], timeout=300) as client:
        done = client.generate(PROMPT, max_tokens=10, temperature=0, ignore_eos=True, tiered=(0.5, 0.0))
        assert done.lossy and sum(done.tiers[f"tier{i}_tokens"] for i in (1, 2, 3)) == 10 == done.completion_tokens
        assert done.stats["lossy"] is True
        plain = client.generate(PROMPT, max_tokens=4, temperature=0)
        assert not plain.lossy and plain.tiers is None
        with pytest.raises(sdk.InvalidRequest, match="tau_high must be in"):
            client.generate(PROMPT, max_tokens=4, tiered=(1.5, 0.5))
        budget = client.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True, max_disagreement=0.05)
        assert budget.lossy and budget.stats["max_disagreement"] == 0.05 and budget.completion_tokens == 6
        with pytest.raises(sdk.InvalidRequest, match="max_disagreement must be in"):
            client.generate(PROMPT, max_tokens=4, max_disagreement=2.0)
        with pytest.raises(sdk.InvalidRequest, match="not both"):
            client.generate(PROMPT, max_tokens=4, tiered=(0.9, 0.9), max_disagreement=0.1)


def test_tiered_verification_is_off_by_default_and_then_refused():
    config = ServeConfig()
    assert config.tiered_verification is False
    server = object.__new__(SpecRouterServer)  # the refusal comes before any work: no router needed
    server.config, server.model, server.info = config, config.served_name, {"max_context": 4096}
    req = oai.parse(oai.CompletionRequest, json.dumps({"model": config.served_name, "prompt": "x", "max_tokens": 4,
                                                       "tiered": {"tau_high": 0.9, "tau_low": 0.5}}).encode())
    with pytest.raises(oai.APIError, match="tiered .lossy. verification is off") as err:
        server._requests(req, prompt="x")
    assert err.value.status == 400 and err.value.param == "tiered"
