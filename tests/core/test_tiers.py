import random

import numpy as np
import pytest

from specrouter.core.tiers import (
    TIER_SLIM,
    TIER_TARGET,
    TIER_UNCHECKED,
    AgreementLog,
    Observation,
    QualityBudget,
    Thresholds,
    TierCounts,
    calibrate,
    calibrate_classes,
)


@pytest.mark.parametrize(
    "tau_high, tau_low, message",
    [
        (0.5, 0.9, "tau_low must be <= tau_high"),
        (1.5, 0.2, "tau_high must be in [0, 1]"),
        (0.9, -0.1, "tau_low must be in [0, 1]"),
        (float("nan"), 0.1, "tau_high must be in [0, 1]"),
    ],
    ids=["low-above-high", "high-above-one", "low-negative", "nan"],
)
def test_bad_thresholds_are_rejected_with_a_clear_message(tau_high, tau_low, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Thresholds(tau_high, tau_low)


@pytest.mark.parametrize(
    "tau_high, tau_low, confidences, expected",
    [
        (0.9, 0.5, [0.95, 0.9, 0.89, 0.5, 0.49, 0.0], [1, 1, 2, 2, 3, 3]),
        (0.9, 0.9, [0.95, 0.9, 0.89], [1, 1, 3]),  # tau_low = tau_high: no tier 2
        (1.0, 0.5, [1.0, 0.7, 0.2], [2, 2, 3]),  # tau_high = 1: no tier 1, a confidence of 1.0 is checked
        (1.0, 1.0, [1.0, 0.99, 0.0], [3, 3, 3]),  # lossless
        (0.0, 0.0, [0.0, 0.5], [1, 1]),  # everything unchecked
        (0.8, 0.3, [], []),  # empty block
    ],
    ids=["three-tiers", "no-slim-tier", "no-unchecked-tier", "lossless", "all-unchecked", "empty"],
)
def test_tiers_follow_the_thresholds(tau_high, tau_low, confidences, expected):
    assert Thresholds(tau_high, tau_low).tiers(confidences) == expected


def test_a_slim_tier_exists_only_below_tau_high():
    assert Thresholds(0.9, 0.5).has_slim_tier and Thresholds(1.0, 0.5).has_slim_tier
    assert not Thresholds(0.9, 0.9).has_slim_tier and not Thresholds(1.0, 1.0).has_slim_tier


def test_a_slim_verifier_loads_only_where_a_slim_tier_would_run_it():
    assert Thresholds(0.9, 0.5).slim_verifier("@skip") == "@skip"
    assert Thresholds(0.9, 0.5).slim_verifier("none") is None and Thresholds(0.9, 0.5).slim_verifier(None) is None
    assert Thresholds(0.9, 0.9).slim_verifier("@skip") is None  # tiers 1 and 3 only


def test_only_tau_one_is_lossless():
    assert Thresholds(1.0, 1.0).lossless
    assert not Thresholds(1.0, 0.99).lossless


def test_tier_counts_add_up():
    rng = random.Random(0)
    th = Thresholds(0.8, 0.4)
    total = TierCounts()
    confidences = []
    for _ in range(20):
        block = [rng.random() for _ in range(rng.randint(0, 6))]
        counts = TierCounts()
        for tier in th.tiers(block):
            counts.add(tier)
        assert counts.num_tokens == len(block)
        total = total + counts
        confidences += block
    assert total.num_tokens == len(confidences)
    assert total.tier1_tokens == sum(c >= 0.8 for c in confidences)
    assert total.tier2_tokens == sum(0.4 <= c < 0.8 for c in confidences)
    assert total.tier3_tokens == sum(c < 0.4 for c in confidences)
    assert total.as_dict().keys() == {"tier1_tokens", "tier2_tokens", "tier3_tokens", "slim_rejections"}


def test_tier_counts_sum_componentwise_and_reject_unknown_tiers():
    a = TierCounts(1, 2, 3, 1)
    b = TierCounts(4, 0, 1, 0)
    assert a + b == TierCounts(5, 2, 4, 1)
    assert (a + b).num_tokens == a.num_tokens + b.num_tokens == 11
    counts = TierCounts()
    counts.add(TIER_UNCHECKED, 2)
    counts.add(TIER_SLIM)
    counts.add(TIER_TARGET, 3)
    assert counts == TierCounts(2, 1, 3, 0)
    with pytest.raises(ValueError, match="tiers are 1, 2 and 3"):
        counts.add(4)


def _obs(spec: list[tuple[float, bool, bool | None]]) -> list[Observation]:
    return [Observation(c, d, s) for c, d, s in spec]


def test_calibration_with_zero_budget_keeps_only_what_never_disagrees():
    # The drafter is right at and above 0.9; the slim verifier is right from 0.5 up; below, both err.
    obs = _obs([(0.95, True, True), (0.9, True, True), (0.7, False, True), (0.5, False, True), (0.3, False, False), (0.1, False, False)])
    cal = calibrate(obs, 0.0)
    assert (cal.thresholds.tau_low, cal.thresholds.tau_high) == pytest.approx((0.31, 0.71))
    assert cal.disagreement == 0.0
    assert cal.tier_shares == pytest.approx((2 / 6, 2 / 6, 2 / 6))
    for o, tier in zip(obs, cal.thresholds.tiers(o.confidence for o in obs)):
        assert (tier == TIER_UNCHECKED and o.drafter_agreed) or (tier == TIER_SLIM and o.slim_agreed) or tier == TIER_TARGET


def test_calibration_widens_the_range_as_the_budget_grows():
    rng = random.Random(1)
    obs = []
    for _ in range(2000):
        c = rng.random()
        obs.append(Observation(c, rng.random() < c, rng.random() < 0.5 + c / 2))
    lows = []
    for budget in (0.0, 0.01, 0.05, 0.2, 1.0):
        cal = calibrate(obs, budget)
        assert cal.disagreement <= budget
        # the reported disagreement is the measured one under those thresholds
        wrong = sum((t == TIER_UNCHECKED and not o.drafter_agreed) or (t == TIER_SLIM and not o.slim_agreed)
                    for o, t in zip(obs, cal.thresholds.tiers(o.confidence for o in obs)))
        assert cal.disagreement == pytest.approx(wrong / len(obs))
        assert sum(cal.tier_shares) == pytest.approx(1.0)
        lows.append(cal.thresholds.tau_low)
    assert lows == sorted(lows, reverse=True)
    assert lows[0] > lows[-1] == 0.0


def test_calibration_without_slim_measurements_has_no_slim_tier():
    obs = _obs([(0.95, True, None), (0.8, True, None), (0.6, False, None), (0.2, False, None)])
    cal = calibrate(obs, 0.0, grid=[0.0, 0.5, 0.7, 0.9, 1.0])
    assert cal.thresholds == Thresholds(0.7, 0.7)
    assert cal.tier_shares == (0.5, 0.0, 0.5)


def test_calibration_falls_back_to_lossless():
    obs = _obs([(1.0, False, False), (0.99, False, False)])
    cal = calibrate(obs, 0.0)
    assert cal.thresholds.lossless and cal.disagreement == 0.0 and cal.tier_shares == (0.0, 0.0, 1.0)
    assert calibrate([], 0.1).thresholds.lossless
    with pytest.raises(ValueError, match="max_disagreement"):
        calibrate(obs, 1.5)


def test_calibration_per_prompt_class():
    easy = _obs([(0.9, True, True)] * 10)
    hard = _obs([(0.9, False, False)] * 10)
    cals = calibrate_classes({"code": easy, "chat": hard}, 0.0)
    assert cals["code"].thresholds == Thresholds(0.0, 0.0)
    assert (cals["chat"].thresholds.tau_low, cals["chat"].thresholds.tau_high) == pytest.approx((0.91, 0.91))
    assert cals["chat"].tier_shares == (0.0, 0.0, 1.0)


def test_a_quality_budget_must_be_a_share():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="max_disagreement"):
            QualityBudget(bad)


def test_agreement_log_is_lossless_until_it_has_measured_enough_then_calibrates_the_budget():
    log = AgreementLog(size=1000, min_observations=100)
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0, 1, 300)
    agreed = rng.uniform(0, 1, 300) < confidences  # a drafter as right as it is sure
    budget = QualityBudget(0.05)
    log.observe("code", "draft", confidences[:99].tolist(), agreed[:99].tolist())
    assert log.thresholds("code", "draft", budget) == Thresholds(1.0, 1.0)
    log.observe("code", "draft", confidences[99:].tolist(), agreed[99:].tolist())
    expected = calibrate([Observation(c, a) for c, a in zip(confidences, agreed)], 0.05).thresholds
    assert log.thresholds("code", "draft", budget) == expected
    assert expected.tau_high == expected.tau_low < 1.0  # no slim tier: its agreement is not measured while serving
    assert log.thresholds("chat", "draft", budget).lossless and log.thresholds("code", "other", budget).lossless


def test_agreement_log_keeps_the_latest_observations():
    log = AgreementLog(size=50, min_observations=10)
    log.observe("code", "draft", [0.99] * 50, [False] * 50)  # a drafter wrong when sure ...
    assert log.thresholds("code", "draft", QualityBudget(0.0)).lossless
    log.observe("code", "draft", [0.99] * 100, [True] * 100)  # ... that became right: the old tokens are gone
    assert len(log.observations("code", "draft")) == 50
    assert log.thresholds("code", "draft", QualityBudget(0.0)).tau_high <= 0.99
