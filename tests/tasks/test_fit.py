"""`specrouter tasks fit`'s choice of the default encoder."""

from specrouter.tasks.fit import ONLINE_BUDGET_MS, ROUTING_FLOOR, EncoderReport, choose


def report(encoder: str, accuracy: float, ms: float) -> EncoderReport:
    return EncoderReport(encoder, 2, ["code", "chat"], {2: 0.1}, accuracy, ms, 1.0)


def test_the_default_is_the_most_accurate_encoder_that_classes_a_request_within_budget():
    hidden, embed, minilm = report("hidden", 1.0, 650.0), report("embed", 0.96, 0.7), report("minilm", 0.975, 29.0)
    assert choose([hidden, embed, minilm]) is embed  # the others cost more than the budget
    fast_and_better = report("fast", 0.98, ONLINE_BUDGET_MS)
    assert choose([hidden, embed, fast_and_better]) is fast_and_better


def test_without_an_accurate_encoder_within_budget_the_most_accurate_wins():
    hidden, sloppy = report("hidden", 1.0, 650.0), report("sloppy", ROUTING_FLOOR - 0.05, 0.5)
    assert choose([sloppy, hidden]) is hidden
    tie = report("hidden-slow", 1.0, 900.0)
    assert choose([tie, hidden]) is hidden  # the cheaper on a tie
