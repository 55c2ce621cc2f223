"""Sampling: the logits -> probabilities transform and the draw of a token from them."""

import torch

from specrouter.core.sampling import SAMPLE_BLOCK, SamplingParams, most_likely, position_generator, probs_from_logits, sample


def test_sample_draws_each_rows_distribution_and_never_a_zero_probability_token():
    gen = torch.Generator().manual_seed(0)
    vocab = 3 * SAMPLE_BLOCK + 77  # several blocks and a ragged last one
    probs = torch.rand(2, vocab, generator=gen) ** 4
    probs[torch.rand(2, vocab, generator=gen) < 0.3] = 0.0
    probs[1, : SAMPLE_BLOCK] = 0.0  # a whole block without mass
    probs /= probs.sum(-1, keepdim=True)
    draws = 100_000
    tokens = sample(probs.repeat_interleave(draws, 0), gen).view(2, draws)
    for row in range(2):
        counts = torch.bincount(tokens[row], minlength=vocab).double()
        assert counts[probs[row] == 0].sum() == 0
        expected = probs[row].double() * draws
        big = expected >= 5
        chi2 = (((counts - expected) ** 2) / expected)[big].sum() + (counts[~big].sum() - expected[~big].sum()) ** 2 / expected[~big].sum()
        dof = int(big.sum())
        # a chi-square with dof degrees of freedom: mean dof, sd sqrt(2 dof); 6 sd fails only for a real bias
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (row, float(chi2), dof)


def test_a_one_hot_row_yields_its_token_without_drawing():
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    one_hot = torch.zeros(3, 10).scatter_(-1, torch.tensor([[2], [9], [0]]), 1.0)
    assert sample(one_hot, gen).tolist() == [2, 9, 0]
    assert torch.equal(gen.get_state(), state)


def test_a_positions_generator_depends_on_the_seed_and_position_alone():
    draw = lambda seed, position: torch.rand(4, generator=position_generator(seed, position))  # noqa: E731
    assert torch.equal(draw(3, 17), draw(3, 17))
    assert not torch.equal(draw(3, 17), draw(3, 18)) and not torch.equal(draw(3, 17), draw(4, 17))


def test_most_likely_is_torch_argmax_with_ties_to_the_first_token():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3 * SAMPLE_BLOCK, generator=gen)
    logits[1, [7, 300, 1000]] = 50.0  # a three-way tie: the first wins
    logits[2] = 0.0  # a flat row: token 0
    for scores in (logits, logits.bfloat16(), torch.softmax(logits, -1)):
        assert torch.equal(most_likely(scores), scores.argmax(-1))
    assert most_likely(logits)[1:3].tolist() == [7, 0]
    greedy = probs_from_logits(logits, SamplingParams())
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float())
