"""The token-level intersection of SmolLM2's and Qwen2.5's real tokenizers: what is shared, and that
text translated token by token spells the same bytes, whatever the boundaries."""

import pytest
import torch
from transformers import AutoTokenizer

from specrouter.core.vocab import VocabMap, token_bytes, vocab_map

SMOL_ROWS, QWEN_ROWS = 49152, 151936

BOUNDARY_TEXTS = [
    "def f(x):\n\tif x:\n        return [i ** 2 for i in range(x)]\n\n\n    pass  ",  # code indentation
    "Party 🎉🎉 with 👩‍👩‍👧 and 🇯🇵!",  # emoji (multi-token, partial UTF-8 pieces), ZWJ sequences, flags
    "中文分词测试：你好，世界。日本語のテキスト、한국어",  # CJK
    "3.14159265358979 1,000,000 0x1F -42e-7 12345678901234567890",  # numbers
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",  # special tokens
    "naïve café – “quotes” ‘single’ … ½ ∑ ∞ \u00a0nbsp",
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir, qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def smol_to_qwen(tokenizers) -> VocabMap:
    smol, qwen = tokenizers
    return vocab_map(smol, qwen, SMOL_ROWS, QWEN_ROWS)


def own_bytes(tokenizer, ids: list[int]) -> bytes:
    special = set(tokenizer.get_added_vocab().values())
    return b"".join(token_bytes(tokenizer.convert_ids_to_tokens(i), i in special) for i in ids)


def test_map_is_built_once_per_pair_and_reports_its_size(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    assert vocab_map(smol, qwen, SMOL_ROWS, QWEN_ROWS) is smol_to_qwen
    report = smol_to_qwen.report()
    assert report["own_vocab"] == SMOL_ROWS and report["target_vocab"] == QWEN_ROWS
    assert 35000 < report["num_shared"] < SMOL_ROWS
    assert report["coverage_of_own"] == round(report["num_shared"] / SMOL_ROWS, 4)
    assert int(smol_to_qwen.allowed.sum()) == report["num_shared"]


def test_shared_tokens_have_identical_strings(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    own = smol.convert_ids_to_tokens(smol_to_qwen.shared_own.tolist())
    target = qwen.convert_ids_to_tokens(smol_to_qwen.shared_target.tolist())
    assert own == target


@pytest.mark.parametrize("name", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
def test_end_and_chat_tokens_map_to_their_counterparts(tokenizers, smol_to_qwen, name):
    smol, qwen = tokenizers
    own, target = smol.convert_tokens_to_ids(name), qwen.convert_tokens_to_ids(name)
    assert smol_to_qwen.tokens_to_target([own]) == [target]
    assert smol_to_qwen.spellings[target] == (own,)


def test_special_tokens_match_only_special_tokens(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    fim = qwen.convert_tokens_to_ids("<|fim_prefix|>")  # Qwen only: spelled as text for SmolLM2's context
    assert own_bytes(smol, list(smol_to_qwen.spellings[fim])) == b"<|fim_prefix|>"
    assert len(smol_to_qwen.spellings[fim]) > 1


@pytest.mark.parametrize("text", BOUNDARY_TEXTS, ids=["code", "emoji", "cjk", "numbers", "special", "punctuation"])
def test_boundary_text_round_trips_through_the_map(tokenizers, smol_to_qwen, text):
    smol, qwen = tokenizers
    target_ids = qwen(text)["input_ids"]
    own, ends = smol_to_qwen.to_own(target_ids)
    assert smol.decode(own) == text == qwen.decode(target_ids)
    # Prefix-stable: every prefix of the target tokens spells the same bytes as its own-id prefix.
    for j in range(len(target_ids)):
        assert own_bytes(smol, own[: ends[j]]) == own_bytes(qwen, target_ids[: j + 1])
    # Drafted shared tokens come back as the target's ids for the same bytes.
    shared = [o for o in own if smol_to_qwen.allowed[o]]
    assert own_bytes(qwen, smol_to_qwen.tokens_to_target(shared)) == own_bytes(smol, shared)


def test_every_target_token_is_spelled_with_its_own_bytes(tokenizers, smol_to_qwen):
    """Partial UTF-8 tokens included; only tokens holding a byte SmolLM2's vocabulary lacks (bytes
    that never occur in UTF-8 text, a few control bytes) are spelled without it, and counted."""
    smol, qwen = tokenizers
    special = set(qwen.get_added_vocab().values())
    lossy = 0
    partial = 0
    for t, spelling in enumerate(smol_to_qwen.spellings):
        want = token_bytes(qwen.convert_ids_to_tokens(t), t in special)
        got = own_bytes(smol, list(spelling))
        lossy += got != want
        try:
            want.decode()
        except UnicodeDecodeError:
            partial += got == want
    assert lossy == smol_to_qwen.num_lossy <= 64
    assert partial > 1000  # tokens that are partial UTF-8 sequences round-trip too


def test_rows_move_to_the_target_vocabulary_unchanged(smol_to_qwen):
    q_own = torch.zeros(2, SMOL_ROWS)
    ids = smol_to_qwen.shared_own[:3]
    q_own[0, ids] = torch.tensor([0.5, 0.3, 0.2])
    q_own[1, ids[0]] = 1.0
    q_target = smol_to_qwen.rows_to_target(q_own)  # [2, V_target]
    assert q_target.shape == (2, QWEN_ROWS)
    assert torch.equal(q_target[0, smol_to_qwen.shared_target[:3]], torch.tensor([0.5, 0.3, 0.2]))
    assert torch.allclose(q_target.sum(-1), torch.ones(2))


def test_a_token_outside_the_intersection_cannot_be_emitted(tokenizers, smol_to_qwen):
    smol, _ = tokenizers
    outside = int((~smol_to_qwen.allowed).nonzero()[0, 0])
    with pytest.raises(ValueError, match="not shared"):
        smol_to_qwen.tokens_to_target([outside])
