"""Draft-ahead pipelining: blocks drafted while the target verifies are used, and the output stays the
target's (greedy: identical; sampling: the same distribution)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import model_level, tiny_llama
from specrouter.engine.loop import BatchLoop
from specrouter.core.chain import Chain, StepContext
from specrouter.engine.engine import Engine
from specrouter.core.model import ModelView
from specrouter.core.pipeline import pipelined_step
from specrouter.core.records import LevelStats
from specrouter.core.sampling import SamplingParams, probs_from_logits
from specrouter.core.sequence import SequenceState
from conftest import chain_spec, prompts
from test_chain import CHAINS, PROMPTS, build, chi_square_p_value, models, run  # noqa: F401 (fixture)

POOL = ThreadPoolExecutor(1)


def run_pipelined(chain: Chain, prompt: list[int], n: int, params=SamplingParams(), seed=0) -> tuple[list[int], int]:
    """Generate n tokens one pipelined step at a time; also how many steps used a block drafted ahead."""
    seq = SequenceState.new(f"pipe-{seed}", prompt)
    ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset(), {x: LevelStats(x) for x in chain.names})
    ahead, used = None, 0
    while len(seq.generated) < n:
        used += ahead is not None and ahead.fits(chain, list(seq.token_ids))
        (tokens,), (ahead,) = pipelined_step(chain, [seq], [ctx], [n - len(seq.generated)], [], [ahead], POOL)
        seq = seq.commit(tokens)
    for level in chain.levels:
        level.release(seq.seq_id)
    return list(seq.generated), used


PIPELINED_CHAINS = [CHAINS[0], CHAINS[2], CHAINS[4], CHAINS[6]]  # model, n-gram, 3 levels, a slim level in the middle


@pytest.mark.parametrize("names, draft_lens", PIPELINED_CHAINS, ids=["->".join(c[0]) for c in PIPELINED_CHAINS])
def test_pipelined_greedy_chain_output_equals_target_only(models, names, draft_lens):
    target_only = Chain([model_level(models["target"], "target")], [])
    chain = build(models, names, draft_lens)
    for prompt in PROMPTS:
        expected, _ = run(target_only, prompt, 30)
        got, _ = run_pipelined(chain, prompt, 30)
        assert got == expected, f"prompt {prompt}"


def test_blocks_drafted_ahead_are_used_when_the_whole_block_holds(models):
    tokens, used = run_pipelined(build(models, ["close", "target"], [3]), PROMPTS[0], 40)
    assert used >= 3  # the close drafter gets whole blocks and the bonus token right often


SMALL_V = 5


def joint_three_tokens(view: ModelView, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact P(x1, x2, x3 | prompt) [V, V, V] under `view` with `params` applied."""
    def next_probs(ctx):
        return probs_from_logits(view.forward(ctx, 0, view.new_cache(), 1), params)[0]

    joint = torch.zeros(SMALL_V, SMALL_V, SMALL_V)
    p1 = next_probs(prompt)
    for a in range(SMALL_V):
        p2 = next_probs(prompt + [a])
        for b in range(SMALL_V):
            joint[a, b] = p1[a] * p2[b] * next_probs(prompt + [a, b])
    return joint


def test_pipelined_sampling_follows_the_target_joint():
    target = tiny_llama(20, SMALL_V, init_std=0.1)
    drafter = tiny_llama(21, SMALL_V, init_std=0.1, layers=2)  # an unrelated drafter: a biased reuse shows
    chain = Chain([model_level(drafter, "drafter"), model_level(target, "target")], [1])
    params = SamplingParams(temperature=1.0)
    prompt, samples = [1, 3, 2], 2000
    counts, used = torch.zeros(SMALL_V, SMALL_V, SMALL_V), 0
    for seed in range(samples):
        tokens, n_used = run_pipelined(chain, prompt, 3, params, seed=seed)
        counts[tokens[0], tokens[1], tokens[2]] += 1
        used += n_used
    assert used > samples // 10  # the third token often came from a block drafted ahead
    assert chi_square_p_value(counts, joint_three_tokens(ModelView(target), prompt, params)) > 1e-3
    assert chi_square_p_value(counts, joint_three_tokens(ModelView(drafter), prompt, params)) < 1e-6  # power


def test_pipelined_batch_loop_equals_one_at_a_time(tiny_dirs):
    engine = Engine(chain_spec(tiny_dirs, "ngram,draft,target"), dtype="float32", draft_lens=[2, 3])
    requests = [{"prompt_ids": p, "max_new_tokens": 8 + 3 * (i % 3), "ignore_eos": True} for i, p in enumerate(prompts(6, 2000, 7))]
    alone = [engine.generate(**r).token_ids for r in requests]
    assert [r.token_ids for r in BatchLoop(engine, pipeline=True).run(requests)] == alone
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values() if hasattr(level, "worker"))
