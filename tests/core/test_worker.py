import pytest
import torch

from conftest import draft_one, forward_one, tiny_llama
from specrouter.core.model import ModelView
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import PositionGapError, StaleVersionError, TokenLog
from specrouter.core.worker import ModelWorker

GREEDY = SamplingParams()
EMPTY = TokenLog().prefix_hash(0)


def h(tokens: list[int]) -> int:
    """The caller's hash of a prefix the worker should hold."""
    return TokenLog(tokens).prefix_hash(len(tokens))
SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture
def worker():
    return ModelWorker("tiny", ModelView(tiny_llama(0, 300)))


def test_rescoring_after_rejected_tokens_equals_fresh_forward(worker):
    ids = list(range(5, 25))
    forward_one(worker, "a", 0, 0, EMPTY, ids, 1, SAMPLED)
    forward_one(worker, "a", 0, 20, h(ids), [7, 8, 9], 3, SAMPLED)  # speculative tokens, then rejected
    assert worker.cached_length("a") == 23
    rescored = forward_one(worker, "a", 1, 20, h(ids), [11, 12], 2, SAMPLED)
    fresh = forward_one(worker, "b", 0, 0, EMPTY, ids + [11, 12], 2, SAMPLED)
    torch.testing.assert_close(rescored, fresh, atol=1e-6, rtol=1e-5)


def test_forward_at_an_earlier_position_rolls_back_implicitly(worker):
    ids = list(range(5, 25))
    forward_one(worker, "a", 0, 0, EMPTY, ids + [1, 2, 3], 1, SAMPLED)
    rescored = forward_one(worker, "a", 0, 20, h(ids), [11], 1, SAMPLED)
    assert worker.cached_length("a") == 21
    torch.testing.assert_close(rescored, forward_one(worker, "b", 0, 0, EMPTY, ids + [11], 1, SAMPLED), atol=1e-6, rtol=1e-5)


def test_a_repeated_call_is_a_no_op(worker):
    forward_one(worker, "a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    first = forward_one(worker, "a", 1, 6, h(list(range(6))), [6], 1, SAMPLED)
    assert worker.cached_length("a") == 7
    assert torch.equal(forward_one(worker, "a", 1, 6, h(list(range(6))), [6], 1, SAMPLED), first)
    assert worker.cached_length("a") == 7  # rolled back to the same position: nothing more to drop
    assert worker.cached_length("unknown") == 0


def test_stale_version_is_rejected_and_state_kept(worker):
    forward_one(worker, "a", 3, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(StaleVersionError):
        forward_one(worker, "a", 2, 5, h(list(range(5))), [1], 1, GREEDY)
    with pytest.raises(StaleVersionError):
        draft_one(worker, "a", 2, 0, EMPTY, [1], 1, GREEDY, 0)
    assert worker.cached_length("a") == 10


def test_start_beyond_cached_tokens_is_a_gap(worker):
    forward_one(worker, "a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(PositionGapError):
        forward_one(worker, "a", 0, 12, h(list(range(12))), [1], 1, GREEDY)


def test_draft_is_seeded_and_returns_its_distributions(worker):
    ids = list(range(5, 25))
    a = draft_one(worker, "a", 0, 0, EMPTY, ids, 4, SAMPLED, 9)
    b = draft_one(worker, "b", 0, 0, EMPTY, ids, 4, SAMPLED, 9)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 4
    assert a.q_draft.shape == (4, 300)
    assert torch.allclose(a.q_draft.sum(-1), torch.ones(4))
    assert worker.cached_length("a") == len(ids) + 3  # the last drafted token is not cached


def test_release_frees_the_sequence(worker):
    forward_one(worker, "a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    worker.release("a")
    assert worker.num_sequences() == 0


def test_different_prefix_is_refused_and_state_kept(worker):
    forward_one(worker, "a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(PositionGapError, match="different prefix"):
        forward_one(worker, "a", 0, 5, h([9, 9, 9, 9, 9]), [1], 1, GREEDY)  # a replayed message of another branch
    assert worker.cached_tokens("a") == list(range(10))


def _fill(worker, seq_id, tokens):
    forward_one(worker, seq_id, 0, 0, EMPTY, tokens, 1, GREEDY)


def test_a_batched_forward_equals_each_forward_and_one_sequence_rolls_back_alone(worker):
    from specrouter.core.worker import ForwardCall

    alone = ModelWorker("alone", worker.view)
    hist = {s: list(range(3 + i, 13 + 2 * i)) for i, s in enumerate("abc")}
    for w in (worker, alone):
        for s, tokens in hist.items():
            _fill(w, s, tokens)
    # b's last 3 tokens were rejected drafts: its call starts 3 positions back; a and c continue
    starts = {"a": len(hist["a"]), "b": len(hist["b"]) - 3, "c": len(hist["c"])}
    calls = [ForwardCall(s, 1, starts[s], h(hist[s][: starts[s]]), [40, 41], 2, SAMPLED) for s in "abc"]
    batched = worker.forward(calls)
    for call, scored in zip(calls, batched):
        p = scored.p
        ref = forward_one(alone, call.seq_id, 1, call.start, call.prefix_hash, call.token_ids, 2, SAMPLED)
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-5)
        assert worker.cached_tokens(call.seq_id) == hist[call.seq_id][: call.start] + [40, 41]


def test_a_refused_call_in_a_batch_changes_only_its_own_sequence(worker):
    from specrouter.core.worker import ForwardCall

    for s in "ab":
        _fill(worker, s, [1, 2, 3])
    forward_one(worker, "a", 5, 2, h([1, 2]), [3], 1, GREEDY)  # a is at version 5: a version-1 call is stale
    calls = [ForwardCall("a", 1, 3, h([1, 2, 3]), [9], 1, GREEDY), ForwardCall("b", 1, 3, h([1, 2, 3]), [9], 1, GREEDY),
             ForwardCall("c", 0, 2, h([1, 2]), [9], 1, GREEDY)]  # c holds nothing: a gap
    stale, ok, gap = worker.forward(calls)
    assert isinstance(stale, StaleVersionError) and isinstance(gap, PositionGapError)
    assert ok.p.shape == (1, 300) and ok.top is None
    assert worker.cached_tokens("a") == [1, 2, 3] and worker.cached_tokens("b") == [1, 2, 3, 9]


def test_a_batched_draft_equals_each_draft_alone(worker):
    from specrouter.core.worker import DraftCall

    alone = ModelWorker("alone", worker.view)
    calls = [DraftCall(s, 0, 0, EMPTY, list(range(2 + i, 9 + 3 * i)), k, SAMPLED, seed=10 + i)
             for i, (s, k) in enumerate(zip("abcd", (3, 1, 0, 5)))]
    for call, got in zip(calls, worker.draft(calls)):
        ref = draft_one(alone, call.seq_id, 0, 0, EMPTY, call.token_ids, call.k, SAMPLED, call.seed)
        assert got.token_ids == ref.token_ids and len(got.token_ids) == call.k
        torch.testing.assert_close(got.q_draft, ref.q_draft, atol=1e-6, rtol=1e-5)
        assert worker.cached_tokens(call.seq_id) == alone.cached_tokens(call.seq_id)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_draft_stops_after_the_first_token_drafted_below_min_confidence(worker, params):
    ids = list(range(40, 52))
    full = draft_one(worker, "full", 0, 0, EMPTY, ids, 8, params, 4)
    # Each drafted token's probability under the model's softmax (temperature 1: the greedy case's own too).
    rows = forward_one(worker, "probe", 0, 0, EMPTY, ids + full.token_ids[:-1], 8, SAMPLED)  # [8, V]
    confidence = [float(rows[j, t]) for j, t in enumerate(full.token_ids)]
    assert full.confidence == pytest.approx(confidence, rel=1e-4)  # a draft reports how sure it was of each token
    threshold = sorted(confidence)[4]  # the 5th smallest: some token falls below it, not the first one alone
    stop = next(j for j, c in enumerate(confidence) if c < threshold)
    got = draft_one(worker, "stopped", 0, 0, EMPTY, ids, 8, params, 4, threshold)
    assert got.token_ids == full.token_ids[: stop + 1] and got.q_draft.shape[0] == stop + 1
    assert worker.cached_tokens("stopped") == ids + got.token_ids[:-1]  # the last drafted token is not cached
    from specrouter.core.worker import DraftCall

    (batched,) = ModelWorker("batched", worker.view).draft([DraftCall("s", 0, 0, EMPTY, ids, 8, params, 4, threshold)])
    assert batched.token_ids == got.token_ids


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_plain_draft_decodes_its_k_tokens_unsure_or_not_and_returns_no_distributions(worker, params):
    from specrouter.core.worker import DraftCall

    ids = list(range(40, 52))
    (plain,) = worker.draft([DraftCall("plain", 0, 0, EMPTY, ids, 6, params, seed=4, min_confidence=0.999, plain=True)])
    assert len(plain.token_ids) == 6 and plain.q_draft.shape == (0, worker.vocab_size) and plain.confidence is None
    (again,) = ModelWorker("again", worker.view).draft([DraftCall("s", 0, 0, EMPTY, ids, 6, params, seed=4, plain=True)])
    assert again.token_ids == plain.token_ids  # the confidence floor never stops the target's own decoding
