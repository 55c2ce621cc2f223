import pytest

from specrouter.routing.scheduler import expected_tokens, goodput, predict, search


def flat(costs: dict[str, float]):
    return lambda level, n: costs[level]


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25


def test_two_level_prediction_by_hand():
    verify = flat({"t": 1.0})
    t = predict(("d", "t"), (3,), verify, lambda d, n: 0.1 * n, lambda d, v: 0.5, overhead=0.0)
    assert t == pytest.approx((3 * 0.1 + 1.0) / expected_tokens(0.5, 3))
    # a drafting call with a share of its own is charged it once a block, not once a token
    t = predict(("d", "t"), (3,), verify, lambda d, n: 0.05 + 0.1 * n, lambda d, v: 0.5, overhead=0.0)
    assert t == pytest.approx((0.05 + 3 * 0.1 + 1.0) / expected_tokens(0.5, 3))


def test_bottom_drafter_that_stops_early_is_charged_its_expected_block():
    """Asked for 8, it drafts 3 on average: 3 drafted tokens, and the target verifies 3 + 1."""
    verify = lambda level, n: 1.0 + 0.1 * n
    t = predict(("d", "t"), (8,), verify, lambda d, n: 0.1 * n, lambda d, v: 0.5, overhead=0.0, drafted=lambda d, n: min(n, 3.0))
    assert t == pytest.approx((3 * 0.1 + verify("t", 4)) / expected_tokens(0.5, 8))


def test_an_all_or_nothing_block_is_charged_the_expected_pass_not_the_pass_over_its_mean():
    """An n-gram matches 30% of the time and then fills its block: asked for 4, it holds 1.2 tokens on
    average, but the target runs a 1-token pass 70% of the time and a 5-token one 30% of it. Where
    passes over more than 2 tokens cost 3x, that is 0.7 * 1 + 0.3 * 3, not the 2-token pass's 1."""
    verify = lambda level, n: 1.0 if n <= 2 else 3.0
    t = predict(("d", "t"), (4,), verify, lambda d, n: 0.01 * n, lambda d, v: 0.5, overhead=0.0, drafted=lambda d, n: 0.3 * n)
    assert t == pytest.approx((1.2 * 0.01 + 0.7 * 1.0 + 0.3 * 3.0) / expected_tokens(0.5, 4))


def test_a_verifier_emits_at_most_the_block_it_verifies_plus_one():
    """Acceptance and the blocks held are estimated apart; a drafter seen drafting 2 tokens a block
    while its acceptance says 6 tokens a round is charged 3 tokens a round, all it can give."""
    verify = lambda level, n: 1.0
    t = predict(("d", "t"), (8,), verify, lambda d, n: 0.1 * n, lambda d, v: 0.9, overhead=0.0, expected=lambda d, v, g: 6.0,
                drafted=lambda d, n: 2.0)
    assert t == pytest.approx((2 * 0.1 + 1.0) / 3.0)


def test_middle_level_that_stops_early_is_charged_for_the_block_it_holds():
    """Asked for 8, a middle level that ends its blocks unsure holds 3 on average: it runs the rounds
    that emit 3 tokens (as if asked for 3), and the target verifies 3 + 1."""
    verify = lambda level, n: {"m": 0.2 + 0.01 * n, "t": 1.0 + 0.1 * n}[level]
    args = (verify, lambda d, n: 0.05 * n, lambda d, v: 0.5)
    t = predict(("d", "m", "t"), (2, 8), *args, overhead=0.0, drafted=lambda level, n: min(n, 3.0) if level == "m" else n)
    asked_3 = predict(("d", "m", "t"), (2, 3), *args, overhead=0.0)
    assert t == pytest.approx(asked_3 * expected_tokens(0.5, 3) / expected_tokens(0.5, 8))


def test_middle_level_asked_for_one_token_scores_it_alone():
    """The engine asks the level below for n - 1 tokens at most (the level adds its own): a middle
    level proposing one token to the target gets no help from its drafter."""
    verify = lambda level, n: {"m": 0.2 + 0.01 * n, "t": 1.0 + 0.1 * n}[level]
    t = predict(("d", "m", "t"), (3, 1), verify, lambda d, n: 0.05 * n, lambda d, v: 0.5, overhead=0.0)
    assert t == pytest.approx((verify("m", 1) + verify("t", 2)) / expected_tokens(0.5, 1))


@pytest.mark.parametrize("alpha_dm, rounds", [
    (0.0, [(2, 3), (2, 3), (1, 2), (0, 1)]),  # every round yields one token: blocks of 2, 2, 1, 0
    (1.0, [(2, 3), (0, 1)]),  # the first round yields 3 of the 4, the last one scores alone
])
def test_middle_level_runs_rounds_as_the_engine_does(alpha_dm, rounds):
    verify = lambda level, n: {"m": 0.2 + 0.01 * n, "t": 1.0 + 0.1 * n}[level]
    draft, alpha = 0.05, {("d", "m"): alpha_dm, ("m", "t"): 0.7}
    t = predict(("d", "m", "t"), (2, 4), verify, lambda d, n: draft * n, lambda d, v: alpha[(d, v)], overhead=0.0)
    middle = sum(r * draft + verify("m", n) for r, n in rounds)  # the middle level's 4 tokens
    assert t == pytest.approx((middle + verify("t", 5)) / expected_tokens(0.7, 4))


def test_search_finds_known_optimum_among_chains_and_lengths():
    # A cheap, well-aligned drafter beats a slow, slightly better one; the best length is found exactly.
    verify = flat({"t": 1.0, "fast": 0.1, "slow": 0.5})
    per_token = {"fast": 0.1, "slow": 0.5}
    draft = lambda level, n: per_token[level] * n
    alpha = {("fast", "t"): 0.8, ("slow", "t"): 0.9, ("fast", "slow"): 0.85}
    plans = search(["fast", "slow"], "t", verify, draft, lambda d, v: alpha[(d, v)], lengths=tuple(range(1, 11)))
    best = plans[0]
    brute = min((((1 - 0.8 ** (g + 1)) / 0.2, g) for g in range(1, 11)), key=lambda x: (x[1] * 0.1 + 1.0) / x[0])
    assert best.chain == ("fast", "t")
    assert best.draft_lens == (brute[1],)
    assert {p.chain for p in plans} == {("t",), ("fast", "t"), ("slow", "t"), ("fast", "slow", "t")}


def test_search_keeps_the_target_block_within_its_bit_exact_length():
    verify = flat({"t": 1.0, "fast": 0.1})
    alpha = {("fast", "t"): 0.95}
    capped = search(["fast"], "t", verify, {"fast": 0.01}.get, lambda d, v: alpha[(d, v)], lengths=(1, 2, 4, 8), max_top_len=2)
    assert all(p.draft_lens[-1] <= 2 for p in capped if len(p.chain) > 1)
    assert next(p for p in capped if p.chain == ("fast", "t")).draft_lens == (2,)  # the longest allowed: a near-perfect drafter
    none = search(["fast"], "t", verify, {"fast": 0.01}.get, lambda d, v: alpha[(d, v)], lengths=(1, 2, 4, 8), max_top_len=0)
    assert [p.chain for p in none] == [("t",)]  # no block verifies bit-exactly: target-only alone


def test_three_level_chain_wins_when_middle_level_filters_cheaply():
    # The target is very expensive; a middle model is cheap to run and agrees almost perfectly with it,
    # and a tiny bottom drafter agrees well with the middle one only.
    verify = flat({"t": 10.0, "mid": 0.5, "tiny": 0.01})
    per_token = {"tiny": 0.01, "mid": 0.5}
    draft = lambda level, n: per_token[level] * n
    alpha = {("tiny", "mid"): 0.8, ("mid", "t"): 0.97, ("tiny", "t"): 0.3}
    best = search(["tiny", "mid"], "t", verify, draft, lambda d, v: alpha[(d, v)])[0]
    assert best.chain == ("tiny", "mid", "t")


def test_useless_drafter_falls_back_to_target_only():
    best = search(["junk"], "t", flat({"t": 1.0, "junk": 0.2}), lambda d, n: 0.2 * n, lambda d, v: 0.0)[0]
    assert best.chain == ("t",) and best.draft_lens == ()


def test_drafter_only_at_the_bottom_when_it_cannot_verify():
    plans = search(["ngram", "d"], "t", flat({"t": 1.0, "d": 0.1, "ngram": 0.0}), lambda d, n: 0.0, lambda d, v: 0.5,
                   can_verify=lambda n: n != "ngram")
    assert all("ngram" not in p.chain[1:] for p in plans)


def test_goodput_switches_speculation_off_for_a_large_batch_and_back_on_for_a_small_one():
    """Verification cost grows with the batch's tokens (B * (g + 1)); drafting grows slowly."""
    verify = lambda level, n, b: {"t": 0.1 + 0.02 * n * b, "d": 0.01 + 0.001 * n * b}[level]
    draft = lambda level, b: 0.02 + 0.002 * b
    batches = (1, 2, 4, 8, 16, 32)
    best = {b: search(["d"], "t", lambda level, n, b=b: verify(level, n, b), lambda level, n, b=b: n * draft(level, b), lambda d, v: 0.8)[0]
            for b in batches}
    lens = [p.draft_lens[0] if len(p.chain) > 1 else 0 for p in best.values()]
    assert lens[0] >= 2 and lens[-2:] == [0, 0]  # speculation at batch 1, none at 16 and 32
    assert lens == sorted(lens, reverse=True)  # it shrinks as the batch grows
    for b, plan in best.items():
        target_only = predict(("t",), (), lambda level, n: verify(level, n, b), lambda level, n: n * draft(level, b), lambda d, v: 0.8, 0.0)
        assert goodput(plan, b) >= b / target_only  # never predicted slower than plain batched decoding
