import pytest
import torch

from conftest import tiny_llama
from specrouter.model import ModelView
from specrouter.sampling import SamplingParams
from specrouter.sequence import PositionGapError, StaleVersionError, TokenLog
from specrouter.worker import ModelWorker

GREEDY = SamplingParams()
EMPTY = TokenLog().prefix_hash(0)


def h(tokens: list[int]) -> int:
    """The caller's hash of a prefix the worker should hold."""
    return TokenLog(tokens).prefix_hash(len(tokens))
SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture
def worker():
    return ModelWorker("tiny", ModelView(tiny_llama(0, 300)))


def test_truncate_then_rescore_equals_fresh_forward(worker):
    ids = list(range(5, 25))
    worker.forward("a", 0, 0, EMPTY, ids, 1, SAMPLED)
    worker.forward("a", 0, 20, h(ids), [7, 8, 9], 3, SAMPLED)  # speculative tokens, then rejected
    assert worker.truncate("a", 1, 20) == 20
    rescored = worker.forward("a", 1, 20, h(ids), [11, 12], 2, SAMPLED)
    fresh = worker.forward("b", 0, 0, EMPTY, ids + [11, 12], 2, SAMPLED)
    torch.testing.assert_close(rescored, fresh, atol=1e-6, rtol=1e-5)


def test_forward_at_an_earlier_position_rolls_back_implicitly(worker):
    ids = list(range(5, 25))
    worker.forward("a", 0, 0, EMPTY, ids + [1, 2, 3], 1, SAMPLED)
    rescored = worker.forward("a", 0, 20, h(ids), [11], 1, SAMPLED)
    assert worker.cached_length("a") == 21
    torch.testing.assert_close(rescored, worker.forward("b", 0, 0, EMPTY, ids + [11], 1, SAMPLED), atol=1e-6, rtol=1e-5)


def test_repeated_truncate_is_a_no_op(worker):
    worker.forward("a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    assert worker.truncate("a", 1, 6) == 6
    assert worker.truncate("a", 1, 6) == 6
    assert worker.truncate("a", 1, 8) == 6  # beyond the end: nothing to drop
    assert worker.truncate("unknown", 0, 3) == 0


def test_stale_version_is_rejected_and_state_kept(worker):
    worker.forward("a", 3, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(StaleVersionError):
        worker.forward("a", 2, 5, h(list(range(5))), [1], 1, GREEDY)
    with pytest.raises(StaleVersionError):
        worker.truncate("a", 2, 0)
    assert worker.cached_length("a") == 10


def test_start_beyond_cached_tokens_is_a_gap(worker):
    worker.forward("a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(PositionGapError):
        worker.forward("a", 0, 12, h(list(range(12))), [1], 1, GREEDY)


def test_draft_is_seeded_and_returns_its_distributions(worker):
    ids = list(range(5, 25))
    a = worker.draft("a", 0, 0, EMPTY, ids, 4, SAMPLED, seed=9)
    b = worker.draft("b", 0, 0, EMPTY, ids, 4, SAMPLED, seed=9)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 4
    assert a.q_draft.shape == (4, 300)
    assert torch.allclose(a.q_draft.sum(-1), torch.ones(4))
    assert worker.cached_length("a") == len(ids) + 3  # the last drafted token is not cached


def test_release_frees_the_sequence(worker):
    worker.forward("a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    worker.release("a")
    assert worker.num_sequences() == 0


def test_different_prefix_is_refused_and_state_kept(worker):
    worker.forward("a", 0, 0, EMPTY, list(range(10)), 1, GREEDY)
    with pytest.raises(PositionGapError, match="different prefix"):
        worker.forward("a", 0, 5, h([9, 9, 9, 9, 9]), [1], 1, GREEDY)  # a replayed message of another branch
    assert worker.cached_tokens("a") == list(range(10))
