"""The llama.cpp backend: GGUF models behind the same view and worker calls as the torch backend."""

import pytest
import torch

from conftest import forward_one, tiny_llama, write_llama_gguf
from conftest import CHAT_PROMPT, CODE_PROMPT
from specrouter.core.chain import Chain
from specrouter.engine.engine import Engine
from specrouter.core.levels import ModelLevel
from specrouter.core.llamacpp import MIN_SHARED_PREFIX, LlamaCppError, LlamaCppModel, LlamaCppView
from specrouter.core.model import ModelView, SeqBlock
from specrouter.core.sampling import SamplingParams
from specrouter.core.worker import ModelWorker

PROMPT = [1, 17, 305, 4021, 88, 9, 310, 77]


@pytest.fixture(scope="module")
def tiny(tiny_gguf_dirs):
    """The tiny target on both backends: torch fp32 from its safetensors, llama.cpp from its F32 GGUF."""
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(tiny_gguf_dirs["target"], dtype=torch.float32).eval()
    return ModelView(torch_model), LlamaCppView(LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=20))


def test_llamacpp_logits_equal_torch_fp32_on_the_same_weights(tiny):
    torch_view, llama_view = tiny
    expected = torch_view.forward(PROMPT, 0, torch_view.new_cache(), len(PROMPT))
    got = llama_view.forward(PROMPT, 0, llama_view.new_cache(), len(PROMPT))
    assert got.shape == expected.shape == (len(PROMPT), 49152) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)  # llama.cpp keeps keys and values in f16


def test_a_forward_at_an_earlier_position_rolls_back_and_repeating_it_changes_nothing(tiny):
    _, view = tiny
    fresh = view.forward(PROMPT[:5] + [42, 43], 0, view.new_cache(), 2)
    seq = view.new_cache()
    view.forward(PROMPT, 0, seq, 1)
    for _ in range(2):  # roll back to position 5 twice: the same state both times
        torch.testing.assert_close(view.forward([42, 43], 5, seq, 2), fresh, atol=1e-5, rtol=0)


def test_a_16_sequence_batch_equals_each_sequence_alone(tiny):
    _, view = tiny
    prompts = [PROMPT[: 2 + i % 6] + [100 + i] * (1 + i % 3) for i in range(16)]
    alone = [view.forward(p, 0, view.new_cache(), 2) for p in prompts]
    caches = [view.new_cache() for _ in prompts]
    batched = view.forward_batch([SeqBlock(p, 0, c, 2) for p, c in zip(prompts, caches)])
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0)  # to float rounding: the pass shapes differ
    # Each goes on from its own state: one more token on every sequence, again batched.
    nxt = view.forward_batch([SeqBlock([7], len(p), c, 1) for p, c in zip(prompts, caches)])
    for p, row in zip(prompts, nxt):
        torch.testing.assert_close(row, view.forward(p + [7], 0, view.new_cache(), 1), atol=1e-3, rtol=0)


def test_a_released_sequence_gives_its_slot_back(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['draft']}/model.gguf", threads=1, max_sequences=2)
    worker = ModelWorker("draft", LlamaCppView(model))
    from specrouter.core.sequence import TokenLog

    empty = TokenLog().prefix_hash(0)
    for round_ in range(5):  # 10 sequences over 2 slots; the released ones, kept for their prefixes, make way
        for seq in ("a", "b"):
            forward_one(worker, f"{seq}{round_}", 0, 0, empty, LONG_PROMPT + [round_], 1, SamplingParams())
        with pytest.raises(LlamaCppError, match="sequence slots"):
            forward_one(worker, "third", 0, 0, empty, LONG_PROMPT, 1, SamplingParams())
        worker.release(f"a{round_}")
        worker.release(f"b{round_}")


LONG_PROMPT = [(37 * i + 11) % 4000 + 1 for i in range(MIN_SHARED_PREFIX + 8)]


def _recording(model: LlamaCppModel) -> list[list[tuple]]:
    """Every `decode` call's rows from now on (the model's own method, wrapped)."""
    calls, decode = [], model.decode
    model.decode = lambda rows: calls.append(rows) or decode(rows)
    return calls


def test_a_prompt_that_begins_as_a_released_one_runs_only_its_new_tokens_and_scores_the_same(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=4)
    view = LlamaCppView(model)
    first, second = LONG_PROMPT + [5, 6, 7], LONG_PROMPT + [9, 10]
    whole = view.forward(second, 0, view.new_cache(), 2)  # its sequence released at once: kept
    view.forward(first, 0, view.new_cache(), 1)
    calls = _recording(model)
    cache = view.new_cache()
    shared = view.forward(second, 0, cache, 2)
    assert [row[1] for row in calls[0]] == [len(LONG_PROMPT), len(LONG_PROMPT) + 1]  # positions run
    torch.testing.assert_close(shared, whole, atol=1e-3, rtol=0)  # to float rounding: the pass shapes differ
    # It goes on from there as a sequence of its own; rolled back into the shared part, it shares again.
    torch.testing.assert_close(view.forward([3], len(second), cache, 1), view.forward(second + [3], 0, view.new_cache(), 1),
                               atol=1e-3, rtol=0)
    calls.clear()
    again = view.forward(LONG_PROMPT[4:] + [8], 4, cache, 1)
    assert [row[1] for row in calls[0]] == [len(LONG_PROMPT)]
    torch.testing.assert_close(again, view.forward(LONG_PROMPT + [8], 0, view.new_cache(), 1), atol=1e-3, rtol=0)


def test_a_short_prompt_asked_again_runs_only_its_last_token(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=4)
    view = LlamaCppView(model)
    short = LONG_PROMPT[:5]  # shorter than MIN_SHARED_PREFIX, shared because it is shared whole
    first = view.forward(short, 0, view.new_cache(), 1)
    calls = _recording(model)
    again = view.forward(short, 0, view.new_cache(), 1)
    assert [row[1] for row in calls[0]] == [len(short) - 1]
    torch.testing.assert_close(again, first, atol=1e-3, rtol=0)


def test_a_released_sequence_gives_way_to_a_later_one_that_continues_it(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=4)
    view = LlamaCppView(model)
    turn1 = LONG_PROMPT
    turn2 = turn1 + [5, 6, 7, 8]  # the next turn of the conversation
    view.forward(turn1, 0, view.new_cache(), 1)
    view.forward(turn2, 0, view.new_cache(), 1)  # shares turn1's cells, then is released too
    assert [model._held[k] for k in model._kept] == [turn2]  # turn1 alone would add nothing
    view.forward(turn1[:-1], 0, view.new_cache(), 1)  # a prefix of a kept sequence: not kept beside it
    assert [model._held[k] for k in model._kept] == [turn2]
    calls = _recording(model)
    view.forward(turn1 + [9], 0, view.new_cache(), 1)
    assert [row[1] for row in calls[0]] == [len(turn1)]  # turn1's part still comes from the kept turn2


def test_without_prefix_sharing_a_repeated_prompt_runs_whole(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=4, share_prefixes=False)
    view = LlamaCppView(model)
    first = view.forward(LONG_PROMPT, 0, view.new_cache(), 1)
    calls = _recording(model)
    again = view.forward(LONG_PROMPT, 0, view.new_cache(), 1)
    assert len(calls[0]) == len(LONG_PROMPT)
    assert torch.equal(again, first)  # the same pass over the same tokens: the same bits


def test_short_or_unshared_prompts_run_whole_and_kept_sequences_make_room_for_new_ones(tiny_gguf_dirs):
    model = LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, context=256, max_sequences=4)
    view = LlamaCppView(model)
    positions = model.kv_pool.positions
    view.forward(LONG_PROMPT, 0, view.new_cache(), 1)
    calls = _recording(model)
    view.forward(LONG_PROMPT[: MIN_SHARED_PREFIX - 1] + [1, 2], 0, view.new_cache(), 1)  # too short a prefix to share
    assert len(calls[-1]) == MIN_SHARED_PREFIX + 1
    view.forward([4000 - t for t in LONG_PROMPT], 0, view.new_cache(), 1)  # nothing in common
    assert len(calls[-1]) == len(LONG_PROMPT)
    # Three released sequences are kept; a prompt that needs nearly every cell of the cache still runs.
    big = [(11 * i + 3) % 4000 + 1 for i in range(positions - 8)]
    assert view.forward(big, 0, view.new_cache(), 1).shape == (1, model.vocab_size)


GGUF_CHAINS = ["draft@gguf,target@gguf", "ngram,draft@gguf,target@gguf", "draft,target@gguf", "draft@gguf,target",
               "ngram,draft@int8,target@gguf"]


@pytest.fixture(scope="module")
def gguf_target_only(tiny_gguf_dirs):
    engine = Engine(f"{tiny_gguf_dirs['target']}@gguf", dtype="float32")
    return {p: engine.generate_text(p, 24, ignore_eos=True).token_ids for p in (CODE_PROMPT, CHAT_PROMPT)}


@pytest.mark.parametrize("chain", GGUF_CHAINS)
def test_greedy_chain_on_llamacpp_levels_equals_its_target_alone(tiny_gguf_dirs, gguf_target_only, chain):
    """2- and 3-level chains, all on llama.cpp or mixing backends, give exactly what their target gives
    alone on its own backend."""
    spec = ",".join(level if level.startswith("ngram") else tiny_gguf_dirs[level.split("@")[0]] + level[len(level.split("@")[0]):]
                    for level in chain.split(","))
    engine = Engine(spec, dtype="float32", bit_exact=False)  # whole blocks: the tiny F32 files measure width 1
    reference = gguf_target_only
    if not chain.endswith("@gguf"):  # the torch target alone
        target_only = Engine(tiny_gguf_dirs["target"], dtype="float32")
        reference = {p: target_only.generate_text(p, 24, ignore_eos=True).token_ids for p in reference}
    for prompt, tokens in reference.items():
        result = engine.generate_text(prompt, 24, ignore_eos=True)
        assert result.token_ids == tokens, (chain, prompt)
    assert result.level_stats[-2].num_accepted_tokens > 0


def test_real_smollm2_gguf_chains_equal_its_target_alone(smollm2_dir):
    """The real SmolLM2-135M Q4_1 GGUF on llama.cpp as the target, verifying whole blocks (bit_exact off):
    an n-gram + int8 torch chain and an int8 drafter give its greedy output token for token on these
    short prompts (under 256 positions, where its passes of up to 8 tokens round as one-token passes)."""
    target_only = Engine("smollm2-135m@gguf")
    expected = {p: target_only.generate_text(p, 32, ignore_eos=True).token_ids for p in (CODE_PROMPT, CHAT_PROMPT)}
    for chain, lens in (("ngram,smollm2-135m@int8,smollm2-135m@gguf", [3, 4]), ("smollm2-135m@int8,smollm2-135m@gguf", [4])):
        engine = Engine(chain, draft_lens=lens, bit_exact=False)
        for prompt, tokens in expected.items():
            result = engine.generate_text(prompt, 32, ignore_eos=True)
            assert result.token_ids == tokens, (chain, prompt)
        assert result.level_stats[-2].num_accepted_tokens > 0


def test_a_llamacpp_target_caps_its_blocks_at_its_measured_bit_exact_width(tiny_gguf_dirs, caplog):
    """Each model measures at load how wide a pass stays bit-identical to one-token passes; a target
    verifies blocks one token shorter (the pass also runs the token before them), unless told not to.
    A target that verifies no drafted token bit-exactly says at load that its chains decode as it alone."""
    spec = f"{tiny_gguf_dirs['draft']}@gguf,{tiny_gguf_dirs['target']}@gguf"
    with caplog.at_level("WARNING", logger="specrouter.engine.engine"):
        capped = Engine(spec)
    target = capped.levels[f"{tiny_gguf_dirs['target']}@gguf"]
    width = target.worker.exact_width
    assert ("decodes as" in caplog.text) == (width == 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="specrouter.engine.engine"):
        free = Engine(spec, bit_exact=False)
    assert "decodes as" not in caplog.text
    assert 1 <= width <= 8
    assert target.max_block == width - 1 and free.levels[target.name].max_block is None
    result = capped.generate_text(CODE_PROMPT, 16, ignore_eos=True)
    assert result.level_stats[0].num_draft_tokens <= (width - 1) * max(1, result.level_stats[0].num_rounds)
    assert result.token_ids == Engine(f"{tiny_gguf_dirs['target']}@gguf").generate_text(CODE_PROMPT, 16, ignore_eos=True).token_ids


def test_llamacpp_level_reports_the_gguf_description(smollm2_dir):
    engine = Engine("smollm2-135m@gguf")
    assert engine.vocab_size == 49152 and engine.max_positions == 8192
    assert 2 in engine.eos_ids  # <|im_end|>
    assert list(engine.levels) == ["smollm2-135m@gguf"]


# -- exact sampling with llama.cpp levels ------------------------------------------------------------------

SMALL_V = 6


def tiny_vocab_gguf(model, path):
    """A GGUF over a 6-token vocabulary (its own tokenizer metadata: single characters, no merges)."""
    import gguf

    meta = path.with_suffix(".tok.gguf")
    writer = gguf.GGUFWriter(str(meta), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chr(ord("a") + i) for i in range(SMALL_V)])
    writer.add_token_types([1] * SMALL_V)
    writer.add_token_merges(["a b"])  # llama.cpp needs a merges list; "ab" is never produced here
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return write_llama_gguf(model, path, meta)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)],
                         ids=["temperature", "top-k-top-p"])
def test_chain_with_llamacpp_middle_and_target_follows_the_target_joint(tmp_path, params):
    from test_chain import chi_square_p_value, run

    from specrouter.core.sampling import probs_from_logits

    def llama_level(model, name):
        view = LlamaCppView(LlamaCppModel(tiny_vocab_gguf(model, tmp_path / f"{name}.gguf"), threads=1, max_sequences=8))
        return ModelLevel(name, ModelWorker(name, view), bit_exact=False), view  # whole blocks: exactness in distribution

    target, target_view = llama_level(tiny_llama(10, SMALL_V, init_std=0.1), "target")
    middle, middle_view = llama_level(tiny_llama(11, SMALL_V, init_std=0.1), "middle")
    bottom = ModelLevel("bottom", ModelWorker("bottom", ModelView(tiny_llama(12, SMALL_V, init_std=0.1, layers=2))))
    chain = Chain([bottom, middle, target], [2, 2])
    prompt = [1, 4, 2]

    def joint(view) -> torch.Tensor:
        p1 = probs_from_logits(view.forward(prompt, 0, view.new_cache(), 1), params)[0]
        rows = [probs_from_logits(view.forward(prompt + [x], 0, view.new_cache(), 1), params)[0] for x in range(SMALL_V)]
        return p1[:, None] * torch.stack(rows)

    counts = torch.zeros(SMALL_V, SMALL_V)
    for seed in range(3000):
        tokens, _ = run(chain, prompt, 2, params, seed=seed)
        counts[tokens[0], tokens[1]] += 1
    assert chi_square_p_value(counts, joint(target_view)) > 1e-3
    assert chi_square_p_value(counts, joint(middle_view)) < 1e-6  # power: the middle level's own joint is rejected

