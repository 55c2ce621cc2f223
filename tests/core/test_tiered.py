"""Tiered (lossy) verification: lossless at tau = 1, tier accounting, the target's cache after catching up."""

import pytest
import torch

from conftest import model_level, perturbed, tiny_llama
from specrouter.core.chain import Chain, StepContext, speculative_step
from specrouter.core.levels import ProposeItem, ScoreItem
from specrouter.core.model import ModelView
from specrouter.core.records import LevelStats
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState
from specrouter.core.tiered import tiered_step
from specrouter.core.tiers import Thresholds, TierCounts

VOCAB = 300
PROMPTS = [[5, 17, 42, 99, 5, 17, 42, 7, 8, 9], list(range(20, 40)) + list(range(20, 30)), [3]]


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0, VOCAB, init_std=0.08)  # peaked enough that confidences spread over [0, 1]
    return {"target": target, "close": perturbed(target, 1, 0.05), "far": tiny_llama(5, VOCAB, init_std=0.08, layers=2)}


def chain_of(models, drafter: str, slim_skip: tuple[int, ...] | None = (1,), draft_len: int = 4) -> Chain:
    slim = model_level(models["target"], "target@slim", slim_skip) if slim_skip is not None else None
    return Chain([model_level(models[drafter], drafter), model_level(models["target"], "target")], [draft_len], slim=slim)


def run(chain: Chain, prompt: list[int], n: int, tiered: Thresholds | None, params=SamplingParams(), seed=0,
        step=tiered_step) -> tuple[list[int], StepContext, SequenceState]:
    seq = SequenceState.new(f"seq-{seed}", prompt)
    ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset(), {x: LevelStats(x) for x in chain.names}, tiered=tiered)
    while len(seq.generated) < n:
        seq = seq.commit(step(chain, [seq], [ctx], [n - len(seq.generated)], [])[0])
    return list(seq.generated), ctx, seq


def release(chain: Chain, seq: SequenceState) -> None:
    for level in chain.levels + ([chain.slim] if chain.slim else []):
        level.release(seq.seq_id)


def lossless(chain: Chain, prompt: list[int], n: int, params=SamplingParams(), seed=0) -> list[int]:
    out, _, seq = run(chain, prompt, n, None, params, seed, step=speculative_step)
    release(chain, seq)
    return out


@pytest.mark.parametrize("drafter", ["close", "far"])
@pytest.mark.parametrize("with_slim", [True, False], ids=["slim", "no-slim"])
def test_tau_one_without_slim_tier_reproduces_lossless_output(models, drafter, with_slim):
    chain = chain_of(models, drafter, (1,) if with_slim else None)
    target_only = Chain([model_level(models["target"], "target")], [])
    for prompt in PROMPTS:
        expected = lossless(target_only, prompt, 24)
        got, ctx, seq = run(chain, prompt, 24, Thresholds(1.0, 1.0))
        release(chain, seq)
        assert got == expected
        assert ctx.tiers == TierCounts(0, 0, 24, 0)


def test_tau_one_reproduces_lossless_sampling_draw_for_draw(models):
    chain = chain_of(models, "close")
    params = SamplingParams(temperature=0.8)
    for seed, prompt in enumerate(PROMPTS):
        expected = lossless(chain, prompt, 20, params, seed)
        got, _, seq = run(chain, prompt, 20, Thresholds(1.0, 1.0), params, seed)
        release(chain, seq)
        assert got == expected


def test_a_full_depth_slim_verifier_is_the_target(models):
    """A slim verifier that skips no layer decides as the target does: tier 2 alone stays greedy-exact,
    while the target verifies only the blocks holding a tier-3 token."""
    chain = chain_of(models, "close", slim_skip=())
    target_only = Chain([model_level(models["target"], "target")], [])
    for prompt in PROMPTS:
        expected = lossless(target_only, prompt, 24)
        got, ctx, seq = run(chain, prompt, 24, Thresholds(1.0, 0.0))
        release(chain, seq)
        assert got == expected
        assert ctx.tiers.tier2_tokens == 24 and ctx.tiers.tier3_tokens == 0


def test_tier_one_alone_is_the_drafter_unchecked(models):
    drafter_only = Chain([model_level(models["far"], "far")], [])
    chain = chain_of(models, "far")
    for prompt in PROMPTS:
        expected = lossless(drafter_only, prompt, 20)
        got, ctx, seq = run(chain, prompt, 20, Thresholds(0.0, 0.0))
        release(chain, seq)
        assert got == expected
        assert ctx.tiers == TierCounts(20, 0, 0, 0)


def drafter_confidences(models, drafter: str, prompt: list[int], params=SamplingParams()) -> list[float]:
    level = model_level(models[drafter], drafter)
    seq = SequenceState.new("probe", prompt)
    (block,) = level.propose([ProposeItem(seq, prompt, 32, params, 0)])
    return block.confidence


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7)], ids=["greedy", "sampling"])
def test_tier_accounting_adds_up(models, params):
    confidences = sorted(c for p in PROMPTS for c in drafter_confidences(models, "far", p, params))
    tau_low, tau_high = confidences[len(confidences) // 3], confidences[2 * len(confidences) // 3]
    chain = chain_of(models, "far")
    total = TierCounts()
    for seed, prompt in enumerate(PROMPTS):
        got, ctx, seq = run(chain, prompt, 30, Thresholds(tau_high, tau_low), params, seed)
        release(chain, seq)
        assert ctx.tiers.num_tokens == len(got) == 30
        assert ctx.tiers.slim_rejections <= ctx.tiers.tier2_tokens
        total = total + ctx.tiers
    assert total.tier1_tokens > 0 and total.tier2_tokens > 0 and total.tier3_tokens > 0
    assert total.slim_rejections > 0


def test_target_cache_after_tiered_steps_equals_a_fresh_prefill(models):
    chain = chain_of(models, "far")
    confidences = sorted(drafter_confidences(models, "far", PROMPTS[0]))
    thresholds = Thresholds(confidences[len(confidences) // 2], confidences[len(confidences) // 4])
    got, ctx, seq = run(chain, PROMPTS[0], 40, thresholds)
    assert ctx.tiers.tier1_tokens + ctx.tiers.tier2_tokens > 0  # the target did not see every token
    target = chain.levels[-1]
    params = SamplingParams(temperature=1.0)  # full distributions, not one-hot
    tokens = list(seq.token_ids)
    (scored,) = target.score([ScoreItem(seq, tokens, [], params)])  # catches up on what it did not verify
    assert target.worker.cached_tokens(seq.seq_id) == tokens
    # the cached keys and values, read through one more token, against a fresh prefill of them all
    probe = 11
    (cached,) = target.score([ScoreItem(seq, tokens, [probe], params)])
    view = ModelView(models["target"])
    fresh = torch.softmax(view.forward(tokens + [probe], 0, view.new_cache(), 2), dim=-1)  # [2, V]
    torch.testing.assert_close(cached.p, fresh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scored.p[0], fresh[0], atol=1e-5, rtol=1e-4)
    release(chain, seq)


def test_slim_verifier_spec_takes_the_catalogs_measured_set_and_the_targets_quantisation():
    from specrouter.core.catalog import CATALOG
    from specrouter.core.spec import LevelSpec, slim_spec

    target = LevelSpec.parse("qwen2.5-coder-1.5b@w4")
    measured = CATALOG["qwen2.5-coder-1.5b"].slim_verifier_skip
    assert measured and slim_spec("@skip", target) == LevelSpec("qwen2.5-coder-1.5b", measured, "w4")
    assert slim_spec("@skip:3+4", target) == LevelSpec("qwen2.5-coder-1.5b", (3, 4), "w4")
    assert slim_spec("@skip", LevelSpec.parse("/models/other")).skip_layers == ()  # no measured set: the default slim set
    with pytest.raises(ValueError, match="must be the target"):
        slim_spec("qwen2.5-coder-0.5b@skip", target)
    gguf = LevelSpec.parse("qwen2.5-coder-1.5b@gguf")  # every layer, always: no slim verifier
    assert slim_spec("@skip", gguf) is None
    with pytest.raises(ValueError, match="no skip-layer view"):
        slim_spec("@skip:12+13", gguf)
