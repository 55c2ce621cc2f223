"""The multi-level step: greedy identity with target-only decoding, exact sampling distribution."""

import pytest
import torch

from conftest import model_level, perturbed, tiny_llama
from specrouter.core.chain import Chain, StepContext, decode_run, propose, speculative_step
from specrouter.core.levels import ModelLevel, NgramLevel, ProposeItem, ScoreItem
from specrouter.core.records import LevelStats, TimingRecord, VerifyRecord
from specrouter.core.model import ModelView
from specrouter.core.sampling import SamplingParams, probs_from_logits
from specrouter.core.sequence import SequenceState
from specrouter.core.vocab import VocabMap
from specrouter.core.worker import ModelWorker

VOCAB = 300


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0, VOCAB)
    return {"target": target, "close": perturbed(target, 1, 0.05), "far": tiny_llama(5, VOCAB, layers=2)}


def step(chain: Chain, seq: SequenceState, ctx: StepContext, budget: int, timings: list | None = None) -> list[int]:
    """One speculative step of one sequence (a batch of one)."""
    return speculative_step(chain, [seq], [ctx], [budget], timings if timings is not None else [])[0]


def run(chain: Chain, prompt: list[int], n: int, params=SamplingParams(), seed=0) -> tuple[list[int], list[LevelStats]]:
    seq = SequenceState.new(f"seq-{seed}", prompt)
    ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset(), {x: LevelStats(x) for x in chain.names})
    while len(seq.generated) < n:
        seq = seq.commit(step(chain, seq, ctx, n - len(seq.generated)))
    for level in chain.levels:
        level.release(seq.seq_id)
    return list(seq.generated), list(ctx.stats.values())


def build(models, names: list[str], draft_lens: list[int]) -> Chain:
    levels = []
    for name in names:
        if name == "ngram":
            levels.append(NgramLevel(VOCAB))
        elif name.startswith("target@skip"):
            levels.append(model_level(models["target"], name, (1,)))
        else:
            levels.append(model_level(models[name], name))
    return Chain(levels, draft_lens)


PROMPTS = [
    [5, 17, 42, 99, 5, 17, 42, 7, 8, 9],
    list(range(20, 40)) + list(range(20, 30)),
    [3],
]

CHAINS = [
    (["close", "target"], [4]),
    (["far", "target"], [3]),
    (["ngram", "target"], [5]),
    (["target@skip", "target"], [3]),
    (["ngram", "close", "target"], [2, 4]),
    (["far", "target@skip", "target"], [2, 3]),
    (["close", "target@skip", "target"], [3, 5]),
    (["ngram", "far", "close", "target"], [3, 2, 4]),
    (["ngram", "close", "target@skip", "target"], [2, 3, 6]),
]


@pytest.mark.parametrize("names, draft_lens", CHAINS, ids=["->".join(c[0]) for c in CHAINS])
def test_greedy_chain_output_equals_target_only(models, names, draft_lens):
    target_only = Chain([model_level(models["target"], "target")], [])
    chain = build(models, names, draft_lens)
    for prompt in PROMPTS:
        expected, _ = run(target_only, prompt, 30)
        got, stats = run(chain, prompt, 30)
        assert got == expected, f"prompt {prompt}"
    assert stats[-1].num_emitted_tokens >= 30


@pytest.fixture(scope="module")
def sure_models():
    """A target whose confidence in its next token varies (0.07-0.9), a close and a far drafter."""
    target = tiny_llama(0, VOCAB, init_std=0.3)
    return {"target": target, "close": perturbed(target, 1, 0.05), "far": perturbed(target, 2, 0.3)}


def stopping_level(model, name: str, min_confidence: float = 0.2) -> ModelLevel:
    return ModelLevel(name, ModelWorker(name, ModelView(model)), min_confidence=min_confidence)


def test_a_middle_level_that_stops_unsure_proposes_the_block_it_would_draft(sure_models):
    """Greedy, a middle level emits its own most likely tokens; ending its block after one it gave less
    than min_confidence, it proposes exactly what it would have drafted at the bottom of a chain."""
    lengths = []
    for prompt in PROMPTS:
        middle, alone = stopping_level(sure_models["close"], "close"), stopping_level(sure_models["close"], "alone")
        chain = Chain([model_level(sure_models["far"], "far"), middle, model_level(sure_models["target"], "target")], [2, 8])
        seq = SequenceState.new("block", prompt)
        ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset(), {x: LevelStats(x) for x in chain.names})
        (block,) = propose(chain, 1, [seq], [prompt], [8], [ctx], [])
        assert block.token_ids == alone.propose([ProposeItem(seq, prompt, 8, SamplingParams(), seed=0)])[0].token_ids
        assert ctx.stats["far"].num_rounds >= 1  # the middle verified blocks from below
        lengths.append(len(block))
    assert min(lengths) < 8 and max(lengths) > 1  # some blocks stopped unsure, not all at once


@pytest.mark.parametrize("names, draft_lens", [(["far", "close", "target"], [2, 6]), (["ngram", "far", "close", "target"], [3, 2, 6])],
                         ids=["far->close->target", "ngram->far->close->target"])
def test_greedy_chain_whose_levels_stop_unsure_equals_target_only(sure_models, names, draft_lens):
    target_only = Chain([model_level(sure_models["target"], "target")], [])
    levels = [NgramLevel(VOCAB) if n == "ngram" else stopping_level(sure_models[n], n) for n in names[:-1]]
    chain = Chain(levels + [model_level(sure_models["target"], "target")], draft_lens)
    for prompt in PROMPTS:
        expected, _ = run(target_only, prompt, 30)
        got, stats = run(chain, prompt, 30)
        assert got == expected, f"prompt {prompt}"


def test_the_target_verifies_blocks_no_longer_than_its_max_block(models):
    """A target whose wider passes would round differently (max_block) gets blocks of at most that
    length, whatever the chain's draft length; the output is still the target's."""
    chain = build(models, ["close", "target"], [6])
    expected, _ = run(chain, [1, 2, 3], 20)
    chain.levels[-1].max_block = 2
    tokens, stats = run(chain, [1, 2, 3], 20)
    assert tokens == expected
    assert stats[0].num_draft_tokens <= 2 * stats[0].num_rounds and stats[0].num_accepted_tokens > 0


def test_a_target_with_a_max_block_drafts_nothing_into_the_pass_that_prefills_the_prompt(models):
    """The prompt's rows round by the pass's row count (llama.cpp tiles rows in fours): a bit-exact
    target prefills the prompt as the target alone does, and verifies drafted tokens from the next step."""
    chain = build(models, ["close", "target"], [6])
    chain.levels[-1].max_block = 2
    seq = SequenceState.new("prefill-alone", list(range(10, 50)))  # 40 prompt tokens
    ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset(), {x: LevelStats(x) for x in chain.names})
    for i in range(2):
        timings: list[TimingRecord] = []
        committed = step(chain, seq, ctx, 8, timings)
        seq = seq.commit(committed)
        target = next(r for r in timings if r.level == "target")
        if i == 0:
            assert target.num_tokens == 40 and len(committed) == 1
            assert not [r for r in timings if r.level == "close"]  # the drafter did not run
        else:
            assert target.num_tokens == 1 + 2
    for level in chain.levels:
        level.release(seq.seq_id)


def test_timings_count_the_tokens_each_pass_really_ran(models):
    """The first step prefills the prompt on every level: the profile must not take it for a small block."""
    chain = build(models, ["close", "target"], [3])
    seq = SequenceState.new("timed", list(range(10, 50)))  # 40 prompt tokens
    ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset(), {x: LevelStats(x) for x in chain.names})
    for i in range(2):
        timings: list[TimingRecord] = []
        seq = seq.commit(step(chain, seq, ctx, 8, timings))
        target = next(r for r in timings if r.level == "target")
        drafts = [r for r in timings if r.op == "draft"]
        if i == 0:
            assert target.num_tokens == 40 + 3 and not drafts  # a prefill, and the drafter catching up:
            assert [r.op for r in timings if r.level == "close"] == ["prefill"]  # timed apart from its drafting
        else:
            assert target.num_tokens == 1 + 3 and [r.num_tokens for r in drafts] == [3]
    for level in chain.levels:
        level.release(seq.seq_id)


def test_a_block_shorter_than_asked_is_recorded_with_the_length_asked():
    """An n-gram without a match proposes nothing: the round still tells the router what it asked for."""
    target = model_level(tiny_llama(0, VOCAB), "target")
    chain = Chain([NgramLevel(VOCAB), target], [4])
    seq = SequenceState.new("unmatched", [1, 2, 3, 4, 5])  # no repeated n-gram
    ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset(), {x: LevelStats(x) for x in chain.names})
    step(chain, seq, ctx, 8)
    (record,) = [r for r in ctx.drain_records() if isinstance(r, VerifyRecord)]
    assert (record.num_draft_tokens, record.num_accepted_tokens, record.num_asked) == (0, 0, 4)
    assert ctx.stats["ngram"].num_rounds == 0  # the statistics count proposed blocks only
    target.release(seq.seq_id)


def test_acceptance_is_recorded_up_to_the_first_rejection(models):
    """Past a rejection the block's prefix is one the verifier turned down: no acceptance is learnt there."""
    chain = build(models, ["far", "target"], [6])
    ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset(), {x: LevelStats(x) for x in chain.names})
    seq = SequenceState.new("judged", PROMPTS[1])
    records = []
    while len(seq.generated) < 30:
        seq = seq.commit(step(chain, seq, ctx, 30 - len(seq.generated)))
        records += [r for r in ctx.drain_records() if isinstance(r, VerifyRecord)]
    for level in chain.levels:
        level.release(seq.seq_id)
    rejected = [r for r in records if r.num_accepted_tokens < r.num_draft_tokens]
    assert rejected  # a far drafter: some blocks are cut short
    for r in records:
        assert len(r.alphas) == min(r.num_draft_tokens, r.num_accepted_tokens + 1)
        assert r.alphas == [1.0] * r.num_accepted_tokens + [0.0] * (len(r.alphas) - r.num_accepted_tokens)  # greedy


def test_close_drafter_gets_most_tokens_accepted(models):
    _, stats = run(build(models, ["close", "target"], [4]), PROMPTS[0], 40)
    assert stats[0].acceptance_rate > 0.5
    assert stats[0].num_rounds < 40


def test_sampled_chain_is_seeded_deterministic(models):
    chain = build(models, ["ngram", "close", "target"], [2, 3])
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a, _ = run(chain, PROMPTS[0], 20, params, seed=3)
    b, _ = run(chain, PROMPTS[0], 20, params, seed=3)
    c, _ = run(chain, PROMPTS[0], 20, params, seed=4)
    assert a == b and a != c


def test_ngram_drafter_proposes_continuation_of_latest_match():
    ngram = NgramLevel(VOCAB, max_n=3, min_n=2)
    assert ngram.lookup([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert ngram.lookup([1, 2, 3, 4, 5], 3) == []


def test_ngram_with_a_long_minimum_match_drafts_only_where_the_text_repeats_that_long():
    ngram = NgramLevel(VOCAB, max_n=4, min_n=4)
    assert ngram.lookup([5, 1, 2, 3, 4, 7, 8, 0, 1, 2, 3, 4], 2) == [7, 8]  # the last 4 tokens occurred before
    assert ngram.lookup([5, 9, 2, 3, 4, 7, 8, 0, 1, 2, 3, 4], 2) == []  # only the last 3 did: no draft


def test_ngram_cannot_be_a_verifier(models):
    with pytest.raises(ValueError):
        build(models, ["close", "ngram", "target"], [2, 2])


# -- exact sampling distribution of a three-level chain -------------------------------------------------

SMALL_V = 6


def joint_two_tokens(view: ModelView, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact P(x1, x2 | prompt) [V, V] under `view` with `params` applied."""
    p1 = probs_from_logits(view.forward(prompt, 0, view.new_cache(), 1), params)[0]
    rows = [probs_from_logits(view.forward(prompt + [x], 0, view.new_cache(), 1), params)[0] for x in range(SMALL_V)]
    return p1[:, None] * torch.stack(rows)


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit, pooling cells with expected count < 5."""
    n = counts.sum()
    expected = expected_probs.flatten() * n
    counts = counts.flatten()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["temperature", "top-k-top-p"],
)
def test_three_level_chain_first_two_tokens_follow_target_joint(params):
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    middle = tiny_llama(11, SMALL_V, init_std=0.1)  # unrelated models: a bug in passing q upward shows
    bottom = tiny_llama(12, SMALL_V, init_std=0.1, layers=2)
    chain = Chain([model_level(bottom, "bottom"), model_level(middle, "middle"), model_level(target, "target")], [2, 2])
    prompt = [1, 4, 2]
    samples = 3000
    counts = torch.zeros(SMALL_V, SMALL_V)
    for seed in range(samples):
        tokens, _ = run(chain, prompt, 2, params, seed=seed)
        counts[tokens[0], tokens[1]] += 1
    expected = joint_two_tokens(ModelView(target), prompt, params)
    assert chi_square_p_value(counts, expected) > 1e-3
    # Power: the same samples clearly reject the drafters' own joints.
    for drafter in (middle, bottom):
        assert chi_square_p_value(counts, joint_two_tokens(ModelView(drafter), prompt, params)) < 1e-6


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["temperature", "top-k-top-p"],
)
def test_drafts_stopped_below_min_confidence_keep_the_target_joint(params):
    """The drafter ends its block after a token it gave < 0.3 (here: any first token but its favourite),
    so the block's length depends on what it drew; the output must still follow the target."""
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    bottom = ModelLevel("bottom", ModelWorker("bottom", ModelView(tiny_llama(12, SMALL_V, init_std=0.1, layers=2))), min_confidence=0.3)
    chain = Chain([bottom, model_level(target, "target")], [2])
    assert_stops_unsure_keeping_the_target_joint(chain, bottom, target, params, samples=2000)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["temperature", "top-k-top-p"],
)
def test_a_middle_level_that_stops_unsure_keeps_the_target_joint(params):
    """The middle level ends the block it passes up after a token it gave < 0.3, so that block's length
    depends on what it emitted; the output must still follow the target."""
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    middle = ModelLevel("middle", ModelWorker("middle", ModelView(tiny_llama(11, SMALL_V, init_std=0.1))), min_confidence=0.3)
    bottom = tiny_llama(12, SMALL_V, init_std=0.1, layers=2)
    chain = Chain([model_level(bottom, "bottom"), middle, model_level(target, "target")], [2, 2])
    assert_stops_unsure_keeping_the_target_joint(chain, middle, target, params, samples=3000)


def assert_stops_unsure_keeping_the_target_joint(chain: Chain, stopping: ModelLevel, target, params: SamplingParams, samples: int) -> None:
    """Sample the first two tokens `samples` times (a budget of 3: the first block asks for 2 tokens).
    `stopping` ends a block after its first token unless it gave that one >= its min_confidence, as
    often as its own distribution says; the output must still follow the target's joint."""
    prompt = [1, 4, 2]
    counts = torch.zeros(SMALL_V, SMALL_V)
    first_blocks = torch.zeros(3)  # how many first blocks `stopping` proposed had 0, 1, 2 tokens
    for seed in range(samples):
        seq = SequenceState.new(f"seq-{seed}", prompt)
        ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset(), {x: LevelStats(x) for x in chain.names})
        seq = seq.commit(step(chain, seq, ctx, 3))
        first_blocks[ctx.stats[stopping.name].num_draft_tokens] += 1
        while len(seq.generated) < 3:
            seq = seq.commit(step(chain, seq, ctx, 3 - len(seq.generated)))
        for level in chain.levels:
            level.release(seq.seq_id)
        counts[seq.generated[0], seq.generated[1]] += 1
    view = stopping.worker.view
    q_first = probs_from_logits(view.forward(prompt, 0, view.new_cache(), 1), params)[0]
    unsure = float(q_first[q_first < stopping.min_confidence].sum())
    assert abs(first_blocks[1] / samples - unsure) < 0.05 and first_blocks[0] == 0
    assert chi_square_p_value(counts, joint_two_tokens(ModelView(target), prompt, params)) > 1e-3
    assert chi_square_p_value(counts, joint_two_tokens(view, prompt, params)) < 1e-6  # power: not the stopping level's joint


# -- exact sampling distribution with levels on another vocabulary -------------------------------------

# Own vocabulary of 5 tokens against the target's 6: own 0..3 are target 1, 3, 4, 0; own 4 is not
# shared; target 2 and 5 are not shared (spelled with own 4 in the own levels' context).
SMALL_MAP = VocabMap(
    shared_own=torch.tensor([0, 1, 2, 3]),
    shared_target=torch.tensor([1, 3, 4, 0]),
    spellings=((3,), (0,), (4,), (1,), (2,), (4, 4)),
    own_rows=5,
    target_rows=SMALL_V,
    own_vocab=5,
    target_vocab=SMALL_V,
)

CROSS_DISTRIBUTION_CHAINS = {
    "own->target": (["own-bottom"], [2]),
    "own->own->target": (["own-bottom", "own-middle"], [2, 2]),  # a cross level verifying its own tokenizer
    "target-vocab->own->target": (["bottom", "own-middle"], [2, 2]),  # ... and the target's
}


def level_joint(level, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact P(x1, x2 | prompt) [V, V] of a level as it scores (for a cross level: restricted, in target ids)."""
    seq = SequenceState.new("joint", prompt)
    p1 = level.score([ScoreItem(seq, prompt, [], params)])[0].p[0]
    rows = torch.stack([level.score([ScoreItem(seq, prompt + [x], [], params)])[0].p[0] for x in range(SMALL_V)])
    level.release("joint")
    return p1[:, None] * rows


@pytest.mark.parametrize("case", list(CROSS_DISTRIBUTION_CHAINS))
def test_chain_with_cross_vocabulary_levels_follows_target_joint(case):
    params = SamplingParams(temperature=1.0)
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    make = {
        "own-bottom": lambda: ModelLevel("own-bottom", ModelWorker("own-bottom", ModelView(tiny_llama(13, 5, init_std=0.1, layers=2))), SMALL_MAP),
        "own-middle": lambda: ModelLevel("own-middle", ModelWorker("own-middle", ModelView(tiny_llama(14, 5, init_std=0.1))), SMALL_MAP),
        "bottom": lambda: model_level(tiny_llama(12, SMALL_V, init_std=0.1, layers=2), "bottom"),
    }
    names, lens = CROSS_DISTRIBUTION_CHAINS[case]
    drafters = [make[name]() for name in names]
    chain = Chain(drafters + [model_level(target, "target")], lens)
    prompt = [1, 5, 2]  # holds both tokens the own vocabulary lacks
    samples = 2000
    counts = torch.zeros(SMALL_V, SMALL_V)
    for seed in range(samples):
        tokens, stats = run(chain, prompt, 2, params, seed=seed)
        counts[tokens[0], tokens[1]] += 1
    assert chi_square_p_value(counts, joint_two_tokens(ModelView(target), prompt, params)) > 1e-3
    # Power: the same samples clearly reject the drafters' own (restricted) joints.
    for drafter in drafters:
        assert chi_square_p_value(counts, level_joint(drafter, prompt, params)) < 1e-6
    # Tokens the own vocabulary lacks are still produced (from the residual or the bonus row).
    assert counts[[2, 5]].sum() > 0


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["temperature", "top-k-top-p"],
)
def test_plain_decoding_draws_each_token_by_its_position_and_follows_the_target_joint(params):
    """A target token with nothing drafted before it is drawn by its position's generator, whether the
    router draws it after a one-token pass or the target's worker in a decode run: the same tokens
    either way, and they follow the target's joint."""
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    level = model_level(target, "target")
    chain = Chain([level], [])
    prompt = [1, 4, 2]
    counts = torch.zeros(SMALL_V, SMALL_V)
    for seed in range(2000):
        ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset())
        seq = SequenceState.new(f"run-{seed}", prompt)
        seq = seq.commit(step(chain, seq, ctx, 3))  # prefills: its first token is drawn here
        ran = decode_run(level, [seq], [ctx], [2], 2, [])[0]  # the next two on the worker
        stepped = SequenceState.new(f"step-{seed}", prompt)
        ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset())
        for _ in range(3):
            stepped = stepped.commit(step(chain, stepped, ctx, 3 - len(stepped.generated)))
        assert list(stepped.generated) == list(seq.generated) + ran
        counts[seq.generated[0], ran[0]] += 1
        for s_id in (seq.seq_id, stepped.seq_id):
            level.release(s_id)
    expected = joint_two_tokens(ModelView(target), prompt, params)
    assert chi_square_p_value(counts, expected) > 1e-3
    other = tiny_llama(11, SMALL_V, init_std=0.1)  # power: the same samples reject another model's joint
    assert chi_square_p_value(counts, joint_two_tokens(ModelView(other), prompt, params)) < 1e-6
