"""Engine from chain specs on saved tiny models and on the real SmolLM2-135M, in fp32."""

import pytest
import torch

from specrouter.core.levels import ModelLevel
from specrouter.engine.engine import Engine
from specrouter.core.spec import LevelSpec, default_skip_layers, parse_chain
from specrouter.core.store import ModelStore
from specrouter.core.sampling import SamplingParams

from conftest import CHAT_PROMPT, CODE_PROMPT


def hf_greedy(engine: Engine, prompt: str, n: int) -> list[int]:
    """Reference: transformers' own greedy generate on the engine's target model."""
    model = engine.chain.levels[-1].worker.view.hf_model
    ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_level_spec_parsing():
    assert LevelSpec.parse("m@skip:1+3-5") == LevelSpec("m", (1, 3, 4, 5))
    assert LevelSpec.parse("m@skip") == LevelSpec("m", ())
    assert LevelSpec.parse("m@int8") == LevelSpec("m", None, "int8")
    assert LevelSpec.parse("m@skip:2@int8").label == "m@skip:2@int8"
    assert LevelSpec.parse("m@gguf") == LevelSpec("m", None, "gguf") and LevelSpec.parse("m@gguf").backend == "llama.cpp"
    assert LevelSpec.parse("m@w8").backend == "torch"
    assert [s.quant for s in parse_chain("a@int8,b@gguf")] == ["int8", "gguf"]  # a GGUF target on llama.cpp
    assert parse_chain("a,b@w8")[-1].quant == "w8"  # an int8-weight target
    assert LevelSpec.parse("ngram:8") == LevelSpec("ngram", min_match=8) and LevelSpec.parse("ngram:8").label == "ngram:8"
    assert LevelSpec.parse("ngram").label == "ngram"
    for bad in ("m@bogus", "m@skip:x", "@skip", "m@skip:2@gguf", "ngram:0", "ngram:x", "ngram:65", "ngram:8@gguf"):
        with pytest.raises(ValueError):
            LevelSpec.parse(bad)
    with pytest.raises(ValueError):
        parse_chain("a,ngram")
    with pytest.raises(ValueError):
        parse_chain("a,b@skip")
    with pytest.raises(ValueError):
        parse_chain("a,b@int8")
    assert default_skip_layers(28) == (7, 9, 11, 13, 15, 17, 19)


TINY_CHAINS = [
    "draft,target",
    "ngram,target",
    "target@skip:1,target",
    "draft@int8,target",
    "ngram,draft,target",
    "draft,target@skip:2,target",
    "ngram,draft,target@skip:1,target",
    "ngram:3,draft,target",
]


@pytest.mark.parametrize("chain", TINY_CHAINS)
def test_tiny_chain_greedy_equals_transformers_generate(tiny_dirs, chain):
    spec = ",".join(tiny_dirs.get(name.split("@")[0], name.split("@")[0]) + (name[len(name.split("@")[0]) :]) for name in chain.split(","))
    engine = Engine(spec, dtype="float32")
    for prompt in (CODE_PROMPT, CHAT_PROMPT):
        result = engine.generate_text(prompt, 24, ignore_eos=True)
        assert result.token_ids == hf_greedy(engine, prompt, 24), chain
    assert result.level_stats[-1].num_emitted_tokens >= 24


# -- a drafter whose tokenizer differs from the target's (SmolLM2's 49k vs Qwen's 152k) ------------------

BOUNDARY_PROMPT = "    for i in range(10):\n        print('你好, 世界 🎉', i * 3.14159)\n<|im_end|>\n"
# Greedy: a SmolLM2 level drafting at the bottom re-tokenises its text ("text"); one in the middle
# proposes what it verified on the shared tokens ("intersection").
CROSS_CHAINS = [
    ("smol,target", [4], {"smol": "text"}),  # the cross pair at the bottom
    ("ngram,smol,target", [3, 4], {"smol": "intersection"}),
    ("smol,qwen-draft,target", [3, 4], {"smol": "text"}),  # at the bottom of a 3-level chain
    ("smol-far,smol,target", [2, 4], {"smol-far": "text", "smol": "intersection"}),  # smol verifies smol-far, then drafts
    ("qwen-draft,smol,target", [3, 4], {"smol": "intersection"}),  # in the middle, verifying a drafter on the target's tokenizer
]


@pytest.mark.parametrize("chain, draft_lens, modes", CROSS_CHAINS, ids=[c for c, _, _ in CROSS_CHAINS])
def test_cross_tokenizer_chain_greedy_equals_transformers_generate(cross_dirs, chain, draft_lens, modes):
    engine = Engine(",".join(cross_dirs.get(name, name) for name in chain.split(",")), dtype="float32", draft_lens=draft_lens)
    vocab = next(level.vocab for level in engine.chain.levels if level.vocab is not None)
    shared = set(vocab.shared_target.tolist())
    accepted, outside = 0, 0
    for prompt in (CODE_PROMPT, CHAT_PROMPT, BOUNDARY_PROMPT):
        result = engine.generate_text(prompt, 24, ignore_eos=True)
        assert result.token_ids == hf_greedy(engine, prompt, 24), (chain, prompt)
        accepted += sum(s.num_accepted_tokens for s in result.level_stats if "smol" in s.name)
        outside += sum(t not in shared for t in result.token_ids)
    assert accepted > 0  # the translated drafts were accepted, not just rejected
    assert outside > 0  # and the target emitted tokens SmolLM2 lacks (its context spells them in pieces)
    smol = next(s for s in result.as_dict()["levels"] if s["name"].endswith("/smol"))
    assert smol["vocab_map"]["num_shared"] > 30000 and 0.2 < smol["vocab_map"]["coverage_of_target"] < 1
    assert {s["name"].rsplit("/", 1)[-1]: s["cross_tokenizer"] for s in result.as_dict()["levels"] if "cross_tokenizer" in s} == modes


def on_shared_tokens(engine: Engine, name: str) -> Engine:
    """The engine with a cross-tokenizer drafter drafting greedy requests on the shared tokens too (as it
    drafts sampled ones), not re-tokenising its text."""
    level = engine.levels[name]
    engine.replace_level(name, ModelLevel(name, level.worker, level.vocab))
    return engine


def test_cross_tokenizer_greedy_on_the_shared_tokens_alone_equals_transformers_generate(cross_dirs):
    engine = Engine(f"{cross_dirs['smol']},{cross_dirs['target']}", dtype="float32")
    engine = on_shared_tokens(engine, engine.chain.names[0])
    for prompt in (CODE_PROMPT, BOUNDARY_PROMPT):
        result = engine.generate_text(prompt, 24, ignore_eos=True)
        assert result.token_ids == hf_greedy(engine, prompt, 24), prompt
        assert result.level_stats[0].cross_tokenizer == "intersection" and result.level_stats[0].num_accepted_tokens > 0


def test_cross_tokenizer_sampling_is_seeded_and_emits_target_tokens(cross_dirs):
    engine = Engine(f"{cross_dirs['smol']},{cross_dirs['target']}", dtype="float32")
    params = SamplingParams(temperature=0.8, top_k=50)
    a = engine.generate_text(CHAT_PROMPT, 16, params=params, seed=1, ignore_eos=True)
    b = engine.generate_text(CHAT_PROMPT, 16, params=params, seed=1, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.level_stats[0].num_draft_tokens > 0
    assert a.level_stats[0].cross_tokenizer == "intersection"  # sampling stays on the shared tokens (exact)


SMOL_CHAINS = [
    ("ngram,smollm2-135m", [4]),
    ("smollm2-135m@skip:20-25,smollm2-135m", [3]),
    ("smollm2-135m@int8,smollm2-135m", [4]),
    ("ngram,smollm2-135m@int8,smollm2-135m", [3, 4]),
    ("ngram,smollm2-135m@int8,smollm2-135m@skip:24-27,smollm2-135m", [2, 3, 4]),
]


@pytest.fixture(scope="module")
def smol_reference(smollm2_dir):
    target_only = Engine("smollm2-135m", dtype="float32")
    return {p: target_only.generate_text(p, 32, ignore_eos=True).token_ids for p in (CODE_PROMPT, CHAT_PROMPT)}, hf_greedy(
        target_only, CODE_PROMPT, 32
    )


def test_smollm2_target_only_equals_transformers_generate(smol_reference):
    ours, hf = smol_reference
    assert ours[CODE_PROMPT] == hf


@pytest.mark.parametrize("chain, draft_lens", SMOL_CHAINS, ids=[c for c, _ in SMOL_CHAINS])
def test_smollm2_chain_greedy_equals_target_only(smol_reference, chain, draft_lens):
    expected, _ = smol_reference
    engine = Engine(chain, dtype="float32", draft_lens=draft_lens)
    for prompt, tokens in expected.items():
        result = engine.generate_text(prompt, 32, ignore_eos=True)
        assert result.token_ids == tokens, (chain, prompt)
    assert result.level_stats[0].num_draft_tokens > 0


def test_smollm2_drafting_that_stops_unsure_greedy_equals_target_only(smol_reference):
    expected, _ = smol_reference
    engine = Engine("smollm2-135m@int8,smollm2-135m", dtype="float32", draft_lens=[8], draft_confidence=0.5)
    drafted, rounds = 0, 0
    for prompt, tokens in expected.items():
        result = engine.generate_text(prompt, 32, ignore_eos=True)
        assert result.token_ids == tokens, prompt
        drafted, rounds = drafted + result.level_stats[0].num_draft_tokens, rounds + result.level_stats[0].num_rounds
    assert 1.2 < drafted / rounds < 5  # blocks of up to 8 stopped early (~2.2 a round; ~7.3 without), not all at once
    assert Engine("smollm2-135m@int8,smollm2-135m", dtype="float32", draft_confidence=0.5).chain.draft_lens == [10]  # a cap
    with pytest.raises(ValueError, match="draft_confidence"):
        Engine("smollm2-135m", draft_confidence=1.0)


def test_sampling_is_seeded(tiny_dirs):
    engine = Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32")
    params = SamplingParams(temperature=0.8, top_k=50)
    a = engine.generate_text(CHAT_PROMPT, 16, params=params, seed=1, ignore_eos=True)
    b = engine.generate_text(CHAT_PROMPT, 16, params=params, seed=1, ignore_eos=True)
    c = engine.generate_text(CHAT_PROMPT, 16, params=params, seed=2, ignore_eos=True)
    assert a.token_ids == b.token_ids != c.token_ids


def test_generation_stops_at_end_token_and_at_budget(tiny_dirs):
    engine = Engine(tiny_dirs["target"], dtype="float32")
    result = engine.generate_text(CHAT_PROMPT, 10, ignore_eos=True)
    assert len(result.token_ids) == 10 and result.finish_reason == "length"
    engine.eos_ids = frozenset({result.token_ids[3]})
    stopped = engine.generate_text(CHAT_PROMPT, 10)
    assert stopped.finish_reason == "stop" and stopped.token_ids == result.token_ids[: result.token_ids.index(result.token_ids[3]) + 1]


def test_context_window_and_budget_are_checked(tiny_dirs):
    engine = Engine(tiny_dirs["target"], dtype="float32")
    with pytest.raises(ValueError, match="context window"):
        engine.generate(list(range(500)), 100)
    with pytest.raises(ValueError):
        engine.generate([1, 2], 0)


def test_workers_are_released_after_generation(tiny_dirs):
    engine = Engine(f"ngram,{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32")
    engine.generate_text(CHAT_PROMPT, 8)
    assert all(level.worker.num_sequences() == 0 for level in engine.chain.levels[1:])


def test_skip_level_shares_the_target_weights(tiny_dirs):
    engine = Engine(f"{tiny_dirs['target']}@skip:1,{tiny_dirs['target']}", dtype="float32")
    slim, full = (level.worker.view for level in engine.chain.levels)
    assert slim.hf_model is full.hf_model and len(slim.layers) == len(full.layers) - 1


@pytest.mark.heavy
def test_qwen_three_level_chain_greedy_equals_target_only_in_fp32():
    """The default family, in fp32 (bf16 can flip near-tie argmaxes between 1- and k-token passes)."""
    store = ModelStore("float32")
    prompt = 'def mean(xs: list[float]) -> float:\n    """Arithmetic mean of xs."""\n'
    expected = Engine("qwen2.5-coder-1.5b", provider=store).generate_text(prompt, 32, ignore_eos=True).token_ids
    for chain, lens in (("qwen2.5-coder-0.5b,qwen2.5-coder-1.5b", [4]), ("ngram,qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b", [3, 6])):
        result = Engine(chain, provider=store, draft_lens=lens).generate_text(prompt, 32, ignore_eos=True)
        assert result.token_ids == expected, chain
        assert result.level_stats[-2].acceptance_rate > 0.5


@pytest.mark.heavy
def test_real_smollm2_in_front_of_qwen_greedy_equals_target_only_in_fp32():
    """The real cross-tokenizer pair: SmolLM2-135M (49k vocabulary) drafting for Qwen2.5-Coder-0.5B (152k)."""
    store = ModelStore("float32")
    target = Engine("qwen2.5-coder-0.5b", provider=store)
    for prompt in (CODE_PROMPT, BOUNDARY_PROMPT):
        expected = target.generate_text(prompt, 32, ignore_eos=True).token_ids
        result = Engine("smollm2-135m,qwen2.5-coder-0.5b", provider=store, draft_lens=[4]).generate_text(prompt, 32, ignore_eos=True)
        assert result.token_ids == expected, prompt
        assert result.level_stats[0].num_accepted_tokens > 0 and result.level_stats[0].vocab_map["num_shared"] > 30000
        assert result.level_stats[0].cross_tokenizer == "text"


@pytest.mark.heavy
def test_real_smollm2_drafting_text_is_accepted_at_least_as_often_as_on_the_shared_tokens():
    """Greedy, 24 tokens: re-tokenised drafting (every token SmolLM2 can spell) against the intersection."""
    store = ModelStore("float32")
    expected = Engine("qwen2.5-coder-0.5b", provider=store).generate_text(CODE_PROMPT, 24, ignore_eos=True).token_ids
    rates = {}
    for retokenize in (True, False):
        engine = Engine("smollm2-135m,qwen2.5-coder-0.5b", provider=store, draft_lens=[4])
        if not retokenize:
            engine = on_shared_tokens(engine, engine.chain.names[0])
        result = engine.generate_text(CODE_PROMPT, 24, ignore_eos=True)
        assert result.token_ids == expected
        rates[result.level_stats[0].cross_tokenizer] = result.level_stats[0].acceptance_rate
    assert rates["text"] >= rates["intersection"] > 0, rates


@pytest.mark.parametrize("chain", ["draft,target@w8", "ngram,draft@int8,target@w8", "target@skip:1@w8,target@w8",
                                   "draft@w4,target@w4", "ngram,draft,target@w4"])
def test_chain_with_a_weight_only_quantised_target_equals_that_target_alone(tiny_dirs, chain):
    spec = ",".join(level if level == "ngram" else tiny_dirs[level.split("@")[0]] + level[len(level.split("@")[0]):]
                    for level in chain.split(","))
    target_only = Engine(f"{tiny_dirs['target']}@{chain.rsplit('@', 1)[1]}", dtype="float32")
    engine = Engine(spec, dtype="float32")
    for prompt in (CODE_PROMPT, CHAT_PROMPT):
        expected = target_only.generate_text(prompt, 24, ignore_eos=True).token_ids
        assert engine.generate_text(prompt, 24, ignore_eos=True).token_ids == expected, (chain, prompt)
