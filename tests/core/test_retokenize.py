"""Re-tokenising SmolLM2's drafted text into Qwen2.5's tokens after committed Qwen tokens, with the
real tokenizers: whatever the boundary, the tokens continue the committed ones byte for byte and are
the ones Qwen's tokenizer gives for the text."""

import pytest
from transformers import AutoTokenizer

from specrouter.core.retokenize import Retokenizer, retokenizer, starts_word_or_symbol, whole_chars
from specrouter.core.vocab import bytes_to_unicode
from test_vocab import BOUNDARY_TEXTS, QWEN_ROWS, SMOL_ROWS

TEXTS = BOUNDARY_TEXTS + ["def is_palindrome(text: str) -> bool:\n    return text == text[::-1]\n"]
IDS = ["code", "emoji", "cjk", "numbers", "special", "punctuation", "palindrome"]


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir, qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def smol_to_qwen(tokenizers) -> Retokenizer:
    smol, qwen = tokenizers
    return retokenizer(smol, qwen, SMOL_ROWS, QWEN_ROWS)


def smol_ids(smol, data: bytes) -> list[int]:
    """SmolLM2 ids spelling any bytes (partial UTF-8 too): its BPE over the byte-level string."""
    return [piece.id for piece in smol.backend_tokenizer.model.tokenize("".join(bytes_to_unicode()[b] for b in data))]


def spelled(rt: Retokenizer, target_ids: list[int]) -> bytes:
    return b"".join(rt.target_bytes[t] for t in target_ids)


def test_whole_chars_cuts_only_a_partial_character_at_the_end():
    assert whole_chars("a🎉".encode()) == "a🎉".encode()
    assert whole_chars("a🎉".encode()[:-1]) == b"a"
    assert whole_chars("你好".encode()[:4]) == "你".encode()
    assert whole_chars(b"") == b""


def test_anchor_starts_on_a_word_or_symbol():
    assert starts_word_or_symbol(b" return") and starts_word_or_symbol(b"\n") and starts_word_or_symbol(b"(") and starts_word_or_symbol(b"3")
    assert not starts_word_or_symbol(b"indrome") and not starts_word_or_symbol("你".encode()) and not starts_word_or_symbol(b"")


def test_built_once_per_pair(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    assert retokenizer(smol, qwen, SMOL_ROWS, QWEN_ROWS) is smol_to_qwen


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_draft_after_every_committed_boundary_is_the_targets_tokenization(tokenizers, smol_to_qwen, text):
    """Committed: the first c of Qwen's tokens for `text`; drafted: SmolLM2 ids for the rest of its
    bytes (mid-character when c splits an emoji). The draft becomes exactly Qwen's remaining tokens,
    to the last."""
    smol, qwen = tokenizers
    ids = qwen.encode(text, add_special_tokens=False)
    data = text.encode()
    for c in range(1, len(ids)):
        head = spelled(smol_to_qwen, ids[:c])
        got = smol_to_qwen.to_target(ids[:c], smol_ids(smol, data[len(head) :]), 100)
        assert got == ids[c:], (c, qwen.convert_ids_to_tokens(got))


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_a_draft_cut_anywhere_continues_the_committed_bytes(tokenizers, smol_to_qwen, text):
    """The draft ends at every byte (partial UTF-8 included): its tokens, after the committed ones,
    spell a prefix of committed + draft bytes, and are Qwen's tokens for the whole characters there
    (when those start with the committed tokens; else nothing is drafted), the last too; at most n."""
    smol, qwen = tokenizers
    ids = qwen.encode(text, add_special_tokens=False)
    data = text.encode()
    c = len(ids) // 3
    head = spelled(smol_to_qwen, ids[:c])
    for end in range(len(head) + 1, len(data) + 1):
        draft = data[len(head) : end]
        got = smol_to_qwen.to_target(ids[:c], smol_ids(smol, draft), 100)
        assert data[:end].startswith(spelled(smol_to_qwen, ids[:c] + got))
        whole = qwen.encode(whole_chars(data[:end]).decode(), add_special_tokens=False)
        assert got == (whole[c:] if whole[:c] == ids[:c] else []), end
        assert smol_to_qwen.to_target(ids[:c], smol_ids(smol, draft), 2) == got[:2]


def test_special_tokens_map_by_content_and_end_the_draft(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    committed = qwen.encode("<|im_start|>user\nhi", add_special_tokens=False)
    draft = smol.encode(" there<|im_end|>\nmore", add_special_tokens=False)
    assert smol.convert_tokens_to_ids("<|im_end|>") in draft
    got = smol_to_qwen.to_target(committed, draft, 10)
    assert got == qwen.encode(" there<|im_end|>", add_special_tokens=False)  # the special token ends the draft


def test_a_token_straddling_the_boundary_drafts_nothing(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    committed = qwen.encode("x = [1]\n", add_special_tokens=False)
    assert smol_to_qwen.to_target(committed, smol.encode("\n\ny = 2", add_special_tokens=False), 4) == []  # "]\n\n\n"
    # A committed tail that Qwen's tokenizer would not give for its text: "hel" + "lo" is " hello".
    committed = qwen.encode("say", add_special_tokens=False) + qwen.encode(" hel", add_special_tokens=False)
    assert smol_to_qwen.to_target(committed, smol.encode("lo world and more", add_special_tokens=False), 4) == []
    # Drafted after a word that is complete in Qwen's tokens: drafted.
    committed = qwen.encode("say hello", add_special_tokens=False)
    assert spelled(smol_to_qwen, smol_to_qwen.to_target(committed, smol.encode(" world and more", add_special_tokens=False), 4)) == b" world and more"


@pytest.mark.parametrize("text", TEXTS, ids=IDS)
def test_the_drafters_context_is_its_own_tokenization_of_the_committed_text_less_trailing_white_space(tokenizers, smol_to_qwen, text):
    """After every committed boundary: the context spells the committed bytes with the healed ones, is
    SmolLM2's own tokenization of the text (not Qwen's tokens spelled one by one), and a last token of
    white space alone is cut off and returned for the draft to begin with."""
    smol, qwen = tokenizers
    ids = qwen.encode(text, add_special_tokens=False)
    healed = 0
    for c in range(1, len(ids) + 1):
        own, heal = smol_to_qwen.own_context(ids[:c])
        data = spelled(smol_to_qwen, ids[:c])
        assert b"".join(smol_to_qwen.own_bytes[o] for o in own) + heal == data
        if whole_chars(data) == data:
            assert own + smol.encode(heal.decode(), add_special_tokens=False) == smol.encode(data.decode(), add_special_tokens=False)
        assert not heal.strip()
        healed += bool(heal)
    if "\n" in text:
        assert healed > 0


def test_a_newline_before_indentation_is_healed_and_the_draft_continues_past_it(tokenizers, smol_to_qwen):
    """Qwen commits "\\n" and the indentation apart; SmolLM2 spells "\\n   " as one token. The newline is
    healed: the draft must begin with it, and the target tokens start after it."""
    smol, qwen = tokenizers
    committed = qwen.encode("def f(x):\n", add_special_tokens=False)
    own, heal = smol_to_qwen.own_context(committed)
    assert heal == b"\n" and own == smol.encode("def f(x):", add_special_tokens=False)
    draft = smol.encode("\n    return x + 1\n", add_special_tokens=False)
    assert smol_to_qwen.draft_bytes(draft[:1]) == b"\n   "  # the healed token, merged with the indentation
    got = smol_to_qwen.to_target(committed, draft, 10, heal)
    assert got == qwen.encode("def f(x):\n    return x + 1\n", add_special_tokens=False)[len(committed) :]
    assert smol_to_qwen.to_target(committed, smol.encode("pass", add_special_tokens=False), 10, heal) == []  # went another way


def test_a_partial_character_at_the_end_of_the_context_is_spelled_byte_by_byte(tokenizers, smol_to_qwen):
    smol, qwen = tokenizers
    ids = qwen.encode("Party 🎉", add_special_tokens=False)
    data = spelled(smol_to_qwen, ids)
    cut = next(c for c in range(1, len(ids)) if whole_chars(spelled(smol_to_qwen, ids[:c])) != spelled(smol_to_qwen, ids[:c]))
    own, heal = smol_to_qwen.own_context(ids[:cut])
    partial = spelled(smol_to_qwen, ids[:cut])
    assert heal == b"" and smol_to_qwen.draft_bytes(own) == partial and data.startswith(partial)
    assert own[: -len(partial) + len(whole_chars(partial))] == smol.encode(whole_chars(partial).decode(), add_special_tokens=False)
