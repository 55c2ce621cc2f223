import pytest
import torch

from specrouter.core.sampling import SamplingParams, probs_from_logits
from specrouter.core.verification import pairwise_alpha, rejection_sample

V = 10


def one_hot(tokens: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens, dtype=torch.long), V).float().reshape(len(tokens), V)


@pytest.mark.parametrize(
    "draft, target_argmax, expected_tokens, expected_accepted, bonus",
    [
        ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], 3, True),  # perfect match: all accepted + bonus
        ([1, 2, 3], [1, 5, 3, 4], [1, 5], 1, False),  # early mismatch: recovered = target's token
        ([1, 2, 3], [7, 2, 3, 4], [7], 0, False),  # first token wrong
        ([], [6], [6], 0, True),  # empty draft: one bonus token
    ],
    ids=["perfect-match", "early-mismatch", "first-mismatch", "empty-draft"],
)
def test_greedy_verification_keeps_matching_prefix_then_target_token(draft, target_argmax, expected_tokens, expected_accepted, bonus):
    verdict = rejection_sample(draft, one_hot(draft), one_hot(target_argmax), torch.Generator().manual_seed(0))
    assert verdict.tokens == expected_tokens
    assert verdict.num_accepted == expected_accepted
    assert verdict.bonus is bonus
    assert torch.equal(verdict.p_rows, one_hot(target_argmax)[: len(expected_tokens)])


def _random_dist(gen: torch.Generator, n: int = 1) -> torch.Tensor:
    return torch.softmax(torch.randn(n, V, generator=gen) * 1.5, dim=-1)


def _emitted_first_token_histogram(p: torch.Tensor, q: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """Draft one token from q, verify against p; histogram of the first emitted token."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q[0], samples, replacement=True, generator=gen).tolist()
    counts = torch.zeros(V)
    p_target = torch.cat([p, p])  # [k+1=2, V]; the bonus row is irrelevant for the first token
    for x in drafts:
        counts[rejection_sample([x], q, p_target, gen).tokens[0]] += 1
    return counts / samples


def test_rejection_sampler_distribution_converges_to_target():
    gen = torch.Generator().manual_seed(1234)
    p, q = _random_dist(gen), _random_dist(gen)
    references = [_random_dist(gen) for _ in range(5)]
    tv = {}
    for n in (1_000, 10_000, 100_000):
        emp = _emitted_first_token_histogram(p, q, n, seed=n)
        tv[n] = 0.5 * (emp - p[0]).abs().sum().item()
    assert tv[100_000] < tv[1_000]
    assert tv[100_000] < 0.01  # expected ~0.004 at 1e5 samples
    emp = _emitted_first_token_histogram(p, q, 100_000, seed=7)
    for ref in references + [q]:
        assert 0.5 * (emp - p[0]).abs().sum() < 0.5 * (emp - ref[0]).abs().sum()


def test_rejection_sampler_is_deterministic_given_seed():
    gen = torch.Generator().manual_seed(5)
    p, q = _random_dist(gen, 4), _random_dist(gen, 3)
    runs = [rejection_sample([1, 2, 3], q, p, torch.Generator().manual_seed(42)).tokens for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top_k = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (top_k[0, 2:] == 0).all() and torch.isclose(top_k.sum(), torch.tensor(1.0))
    top_p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert full[0, 0] < 0.7 < full[0, :2].sum()  # needs exactly the two most likely tokens
    assert (top_p[0, :2] > 0).all() and (top_p[0, 2:] == 0).all()
    greedy = probs_from_logits(logits, SamplingParams())
    assert greedy.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_pairwise_alpha_is_one_minus_total_variation():
    q_draft = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])  # [2, V]
    p_target = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])  # [2, V]
    tv = 0.5 * (q_draft - p_target).abs().sum(-1)  # [2]
    assert torch.allclose(pairwise_alpha(q_draft, p_target), 1 - tv)
    assert pairwise_alpha(q_draft, p_target).tolist() == [0.5, 1.0]
