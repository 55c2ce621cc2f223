"""The online forward-time profile the router plans with."""

import pytest

from specrouter.routing.profiler import ForwardProfiler


def test_a_level_wide_slowdown_reaches_every_cost_of_the_level():
    """Seen twice in a row (here at block length 1 only), a 3x slowdown reaches the level's other
    block lengths and its drafting cost, and a recovery brings them back."""
    profiler = ForwardProfiler()
    profiler.observe_draft("m", 4, 0.4)  # 0.1 s per token
    profiler.observe_score("m", 1, 0.1)
    profiler.observe_score("m", 8, 0.2)
    profiler.observe_score("t", 1, 0.5)
    for _ in range(2):
        profiler.observe_score("m", 1, 0.3)
    assert profiler.score_time("m", 8) == pytest.approx(0.6, rel=0.1)
    assert profiler.draft_time("m") == pytest.approx(0.3, rel=0.1)
    assert profiler.prefill_time("m", 8) == pytest.approx(0.6, rel=0.1)
    assert profiler.score_time("t", 1) == pytest.approx(0.5)  # other levels are untouched
    for _ in range(2):
        profiler.observe_score("m", 1, 0.1)
    assert profiler.score_time("m", 8) == pytest.approx(0.2, rel=0.15)
    assert profiler.draft_time("m") == pytest.approx(0.1, rel=0.15)


def test_a_single_outlier_moves_only_its_own_block_length():
    profiler = ForwardProfiler()
    profiler.observe_score("t", 1, 0.2)
    profiler.observe_score("t", 8, 0.4)
    profiler.observe_score("t", 8, 2.0)  # a pause
    profiler.observe_score("t", 1, 0.2)
    assert profiler.score_time("t", 1) == pytest.approx(0.2)
    assert profiler.score_time("t", 8) > 0.4


def test_a_catch_up_pass_teaches_the_prefill_rate_a_plan_is_charged():
    """Until a level has cached context, its prefill is priced at its verification passes' bulk rate;
    a pass longer than any block (a drafter catching up, here 150 tokens in 0.45 s) then prices it."""
    profiler = ForwardProfiler()
    profiler.observe_score("d", 32, 0.042)  # 1.3 ms a row
    assert profiler.prefill_time("d", 100) == pytest.approx(0.042 / 32 * 100)
    profiler.observe_score("d", 150, 0.45)
    assert profiler.prefill_time("d", 100) == pytest.approx(0.3)
    assert profiler.score_time("d", 32) == pytest.approx(0.042)  # no verification size learns from it
    profiler.observe_prefill("d", 100, 0.5)  # an EMA step toward 5 ms a token
    assert 0.3 < profiler.prefill_time("d", 100) < 0.5


def test_score_time_interpolates_between_block_lengths_and_stays_flat_outside():
    profiler = ForwardProfiler()
    profiler.observe_score("t", 2, 0.2)
    profiler.observe_score("t", 6, 0.4)
    assert profiler.score_time("t", 4) == pytest.approx(0.3)
    assert profiler.score_time("t", 1) == pytest.approx(0.2)
    assert profiler.score_time("t", 16) == pytest.approx(0.4)


def test_a_drafting_call_is_charged_its_own_share_beside_its_tokens():
    """A cross-tokenizer or remote drafter's call costs 15 ms of its own and 25 ms a token: priced by
    the tokens each call drafted, a short block is not taken for a share of a long one's cost."""
    profiler = ForwardProfiler()
    profiler.observe_draft("d", 1, 0.040)
    profiler.observe_draft("d", 4, 0.115)
    assert profiler.draft_time("d", 1) == pytest.approx(0.040)
    assert profiler.draft_time("d", 2) == pytest.approx(0.065)
    assert profiler.draft_time("d", 8) == pytest.approx(0.215)  # along the line beyond the longest seen
    assert profiler.draft_time("d", 0.5) == pytest.approx(0.0275)  # an expected block of half a token
    one = ForwardProfiler()
    one.observe_draft("d", 4, 0.115)  # one length seen: in proportion to its tokens
    assert one.draft_time("d", 1) == pytest.approx(0.115 / 4)
    noisy = ForwardProfiler()
    noisy.observe_draft("d", 2, 0.02)
    noisy.observe_draft("d", 3, 0.09)  # a line through these would make a token of a 1-token call cost nothing
    assert noisy.draft_time("d", 1) == pytest.approx(0.01)  # at least its token's share of the shortest
    assert noisy.draft_time("d", 4) >= 0.09


def test_a_level_that_costs_next_to_nothing_never_changes_as_a_whole():
    """Prompt lookup takes 0.05-0.6 ms a token, often 3x off its estimate either way: no level-wide
    change (each would make every route re-plan at once), and its cost stays its recent average."""
    profiler = ForwardProfiler()
    for i in range(200):
        profiler.observe_draft("ngram", 3, 3 * (1e-4, 6e-4, 5e-5, 3e-4)[i % 4])
    assert profiler.changes == 0
    assert 5e-5 < profiler.draft_time("ngram") < 6e-4
    for _ in range(2):  # a real level-wide change of a level that costs something is still seen
        profiler.observe_draft("ngram", 3, 3 * 0.01)
    assert profiler.changes == 1


def test_a_level_on_anothers_device_follows_that_levels_changes():
    """A skip-layer view runs on its model's device: when that level slows down as a whole (seen in its
    own passes only), so does the view, and it comes back with it."""
    profiler = ForwardProfiler()
    profiler.share("t@skip", "t")
    profiler.observe_score("t", 4, 0.2)
    profiler.observe_score("t@skip", 4, 0.15)
    profiler.observe_draft("t@skip", 1, 0.1)
    for _ in range(2):
        profiler.observe_score("t", 4, 0.6)
    assert profiler.score_time("t@skip", 4) == pytest.approx(0.45, rel=0.1)
    assert profiler.draft_time("t@skip") == pytest.approx(0.3, rel=0.1)
    for _ in range(2):  # its own passes, as slow as predicted now: no change of its own
        profiler.observe_score("t@skip", 4, 0.45)
    assert profiler.changes == 1
    for _ in range(2):
        profiler.observe_score("t", 4, 0.2)
    assert profiler.score_time("t@skip", 4) == pytest.approx(0.15, rel=0.15)


def test_the_longest_block_a_router_plans_fills_the_widest_pass_the_profiler_times():
    from specrouter.routing.config import MAX_DRAFT_LEN, RouterConfig
    from specrouter.routing.profiler import BUCKETS

    assert MAX_DRAFT_LEN + 1 == BUCKETS[-1]  # a block and the verifier's own token
    assert max(RouterConfig().lengths + RouterConfig().lookup_lengths) <= MAX_DRAFT_LEN
