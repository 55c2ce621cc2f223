"""Tiered (lossy) verification through the engine and the generation loop: opt-in, named, counted."""

import pytest

from specrouter.core.sampling import SamplingParams
from specrouter.core.store import ModelStore
from specrouter.core.tiers import QualityBudget, Thresholds, calibrate
from specrouter.routing.config import RouterConfig
from specrouter.routing.profiler import BUCKETS
from specrouter.engine.calibration import router_for
from specrouter.engine.engine import Engine
from specrouter.engine.loop import BatchLoop

PROMPT = [5, 17, 42, 99, 5, 17, 42, 7, 8, 9]


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", provider=ModelStore("float32"), slim_verifier="@skip:1")


def test_tau_one_is_lossless_and_says_so(engine):
    lossless = engine.generate(PROMPT, 16, ignore_eos=True)
    tiered = engine.generate(PROMPT, 16, ignore_eos=True, tiered=Thresholds(1.0, 1.0))
    assert tiered.token_ids == lossless.token_ids
    assert not tiered.lossy and tiered.as_dict()["lossy"] is False
    assert tiered.as_dict()["verification"] == "tiered" and tiered.as_dict()["tiers"]["tier3_tokens"] == 16
    assert "verification" not in lossless.as_dict() and lossless.as_dict()["lossy"] is False


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0)], ids=["greedy", "sampling"])
def test_a_lossy_request_counts_every_token_in_its_tiers(engine, params):
    result = engine.generate(PROMPT, 20, params=params, ignore_eos=True, tiered=Thresholds(0.0, 0.0))
    body = result.as_dict()
    assert body["lossy"] is True and (body["tau_high"], body["tau_low"]) == (0.0, 0.0)
    assert body["tiers"] == {"tier1_tokens": 20, "tier2_tokens": 0, "tier3_tokens": 0, "slim_rejections": 0}
    slim = engine.generate(PROMPT, 20, params=params, ignore_eos=True, tiered=Thresholds(1.0, 0.0))
    assert slim.tiers.tier2_tokens + slim.tiers.tier3_tokens == 20 and slim.tiers.tier2_tokens > 0


def test_lossless_and_tiered_requests_share_a_batch(engine):
    alone = engine.generate(PROMPT, 12, ignore_eos=True)
    loop = BatchLoop(engine, max_batch=4)
    lossless, tiered = loop.run([{"prompt_ids": PROMPT, "max_new_tokens": 12, "ignore_eos": True},
                                 {"prompt_ids": PROMPT[:6], "max_new_tokens": 12, "ignore_eos": True, "tiered": Thresholds(0.0, 0.0)}])
    assert lossless.token_ids == alone.token_ids and not lossless.lossy and lossless.tiers is None
    assert tiered.lossy and tiered.tiers.num_tokens == 12 == tiered.tiers.tier1_tokens
    for level in engine.all_levels:  # the slim verifier too: nothing left cached for finished requests
        assert level.worker.num_sequences() == 0


def test_the_slim_verifier_is_a_view_of_the_target(tiny_dirs):
    store = ModelStore("float32")
    for bad in (f"{tiny_dirs['draft']}@skip:1", "@int8", f"{tiny_dirs['target']}"):
        with pytest.raises(ValueError, match="slim verifier"):
            Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", provider=store, slim_verifier=bad)


def test_a_llamacpp_target_tiers_without_a_slim_verifier(tiny_gguf_dirs):
    """A llama.cpp target has no skip-layer view: a layer set is refused, the default `@skip` means none,
    and its medium-confidence tokens go to the target."""
    chain = f"{tiny_gguf_dirs['draft']}@gguf,{tiny_gguf_dirs['target']}@gguf"
    with pytest.raises(ValueError, match="no skip-layer view"):
        Engine(chain, slim_verifier="@skip:1")
    engine = Engine(chain, bit_exact=False, slim_verifier="@skip")
    assert engine.slim is None
    alone = Engine(f"{tiny_gguf_dirs['target']}@gguf").generate(PROMPT, 16, ignore_eos=True)
    assert engine.generate(PROMPT, 16, ignore_eos=True, tiered=Thresholds(1.0, 1.0)).token_ids == alone.token_ids
    result = engine.generate(PROMPT, 16, ignore_eos=True, tiered=Thresholds(1.0, 0.0))  # every token "medium"
    assert result.lossy and result.tiers.tier2_tokens == 0 and result.tiers.tier3_tokens == 16
    assert result.token_ids == alone.token_ids  # the target checked every token


def _routed(engine, measured_tiered_s: float | None, measured_lossless_s: float | None):
    """A router over the engine that has measured tiered and lossless steps at these seconds a token,
    and a target whose one-token pass costs far more than its wider ones: it plans the chain that drafts."""
    router = router_for(engine, RouterConfig(explore_every=0), calibrate=False)
    drafter, target = list(engine.levels)
    router.profiler.observe_score(target, 1, 1.0)
    for n in BUCKETS[1:]:
        router.profiler.observe_score(target, n, 0.001)
    router.profiler.observe_draft(drafter, 1, 0.001)
    if measured_tiered_s is not None:
        router.tiering.observe("default", 1, True, measured_tiered_s, 1)
    if measured_lossless_s is not None:
        router.tiering.observe("default", 1, False, measured_lossless_s, 1)
    return router


def test_a_routed_request_declines_to_tier_where_tiered_steps_are_measured_slower(engine):
    """Every token would be tier 1 (thresholds 0), yet the router measured tiered steps slower than
    lossless ones: every step is lossless, the output is the target's, its tokens are tier 3."""
    alone = Engine(engine.chain.names[-1], provider=ModelStore("float32")).generate(PROMPT, 16, ignore_eos=True)
    result = engine.generate(PROMPT, 16, ignore_eos=True, tiered=Thresholds(0.0, 0.0), router=_routed(engine, 10.0, None))
    assert result.token_ids == alone.token_ids
    assert result.tiers.as_dict() == {"tier1_tokens": 0, "tier2_tokens": 0, "tier3_tokens": 16, "slim_rejections": 0}
    assert all(len(plan["chain"]) == 2 for plan in result.routing["steps_by_plan"])  # the router's chain drafts
    assert [d["tiered"] for d in result.routing["tiering"]] == [False]
    assert result.routing["tiering"][0]["reason"].startswith("lossless")


def test_a_routed_request_tiers_where_tiered_steps_are_measured_faster(engine):
    router = _routed(engine, None, 10.0)
    result = engine.generate(PROMPT, 16, ignore_eos=True, tiered=Thresholds(0.0, 0.0), router=router)
    assert result.tiers.tier1_tokens == 16 and result.lossy
    assert [d["tiered"] for d in result.routing["tiering"]] == [True]
    assert router.tiering.rate("default", 1, True) < 10.0  # its tiered steps were measured


def test_a_quality_budget_is_lossless_until_the_loop_has_measured_the_drafters_agreement_then_calibrates(engine):
    loop = BatchLoop(engine, max_batch=1)
    drafter, target = engine.chain.names
    alone = Engine(target, provider=ModelStore("float32")).generate(PROMPT, 16, ignore_eos=True)
    anything = QualityBudget(1.0)  # every token may differ: once calibrated, nothing is checked
    (first,) = loop.run([{"prompt_ids": PROMPT, "max_new_tokens": 16, "ignore_eos": True, "tiered": anything}])
    assert first.token_ids == alone.token_ids and first.tiers.tier3_tokens == 16 and first.tiered.lossless
    assert first.lossy and first.as_dict()["max_disagreement"] == 1.0  # a budget's output may differ: it says so
    # greedy requests' verifications teach the loop how often the target agrees with the drafter, by confidence
    loop.run([{"prompt_ids": PROMPT[: 3 + i], "max_new_tokens": 48, "ignore_eos": True} for i in range(6)])
    assert len(loop.agreement.observations("default", drafter)) >= 200
    (tiered,) = loop.run([{"prompt_ids": PROMPT, "max_new_tokens": 16, "ignore_eos": True, "tiered": anything}])
    assert tiered.tiered == Thresholds(0.0, 0.0) and tiered.tiers.tier1_tokens == 16
    strict = loop.agreement.thresholds("default", drafter, QualityBudget(0.0))
    measured = calibrate(loop.agreement.observations("default", drafter), 0.0)
    assert strict == measured.thresholds and measured.disagreement == 0.0
