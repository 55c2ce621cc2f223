"""Tiered (lossy) mode tiers only where its steps are measured faster than lossless ones."""

from specrouter.routing.tiering import TieringChoice


def test_tiers_first_then_measures_lossless_then_keeps_the_faster_mode():
    choice = TieringChoice(margin=0.05, explore_every=0)
    assert choice.choose("code", 1)[0] is True  # nothing measured: try tiering
    choice.observe("code", 1, True, seconds=0.30, tokens=3)  # 100 ms a token
    assert choice.choose("code", 1)[0] is False  # lossless not measured yet
    choice.observe("code", 1, False, seconds=0.05, tokens=1)  # 50 ms a token
    tiered, why = choice.choose("code", 1)
    assert tiered is False and "100.0" in why and "50.0" in why
    assert choice.choose("chat", 1)[0] is True and choice.choose("code", 4)[0] is True  # per class and batch size


def test_tiering_must_beat_lossless_by_the_margin():
    choice = TieringChoice(margin=0.1, explore_every=0)
    choice.observe("code", 1, True, 0.096, 1)
    choice.observe("code", 1, False, 0.100, 1)
    assert choice.choose("code", 1)[0] is False  # 4% faster is within the margin: lossless
    for _ in range(20):
        choice.observe("code", 1, True, 0.050, 1)
    assert choice.choose("code", 1)[0] is True
    assert choice.rate("code", 1, True) < 0.06  # the running estimate follows its steps


def test_the_mode_out_of_use_runs_once_every_explore_every_steps():
    choice = TieringChoice(margin=0.05, explore_every=3)
    choice.observe("code", 1, True, 0.2, 1)
    choice.observe("code", 1, False, 0.1, 1)
    modes = []
    for _ in range(8):
        tiered, _why = choice.choose("code", 1)
        modes.append(tiered)
        choice.observe("code", 1, tiered, 0.2 if tiered else 0.1, 1)
    assert modes == [False, False, True, False, False, False, True, False]


def test_a_step_that_committed_nothing_teaches_nothing():
    choice = TieringChoice()
    choice.observe("code", 1, True, 1.0, 0)
    assert choice.rate("code", 1, True) is None
