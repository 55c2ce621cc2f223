"""Text-level re-tokenised drafting across tokenizers, for greedy requests.

The intersection (specrouter/core/vocab.py) keeps a drafter on another tokenizer exact for sampling, but
caps what it can propose. At temperature 0 a verifier needs only a guess: a block whose q_draft is
one-hot on each proposed token is accepted exactly where the verifier's argmax agrees, so the output
stays token-identical to the target alone, whatever the guess. So the drafter drafts freely in its
own vocabulary, its tokens become bytes, and the bytes become the target's tokens, in context:

0. the drafter reads the committed text as its own tokenizer spells it (as transformers' universal
   assisted generation does), not the target's tokens spelled one by one, which it never saw in
   training (Qwen2.5 commits "\n" apart from the next line's indentation; SmolLM2 spells "\n   " as one
   token). A last token of white space alone is left out and the draft must begin with its bytes
   (token healing): on HumanEval this raised SmolLM2 -> Qwen2.5-1.5B from 1.90 to 2.40 tokens per
   target step;
1. anchor: the last few committed target tokens, starting at a token that begins a word or a symbol
   (a likely pre-token boundary of the target's tokenizer) on a whole UTF-8 character;
2. re-tokenise anchor bytes + draft bytes with the target's tokenizer, the draft cut after its first
   special token (special tokens map by content) and the text after its last whole character;
3. go on only if that reproduces the anchor's tokens exactly: then the new tokens start on the
   committed boundary (otherwise a token would straddle it, or the committed tail is not what the
   tokenizer gives for its text, and nothing is drafted);
4. keep new tokens while their bytes spell the draft's (the tokenizer may normalise the text), at most
   n. The last may be one that more text would have merged into (" ret" of " return"): kept all the
   same, since at worst the verifier rejects it and emits its own token there, as it would have
   emitted a bonus token after a block without it (measured: 2.47 -> 2.67 target tokens per step on
   chat for SmolLM2 -> Qwen2.5-1.5B, and one drafter pass less per block than drafting one more to drop).

Both tokenizers must be byte-level BPE (as for the intersection). A re-tokeniser is built once per
(own, target) tokenizer pair and row counts, and cached in memory.
"""

from __future__ import annotations

from specrouter.core.vocab import byte_table, tokenizer_fingerprint


def whole_chars(data: bytes) -> bytes:
    """The longest prefix of `data` that is valid UTF-8 (a partial character at the end is cut)."""
    try:
        data.decode()
        return data
    except UnicodeDecodeError as exc:
        return data[: exc.start]


def starts_word_or_symbol(data: bytes) -> bool:
    """Does a token spelling `data` likely start a pre-token: ASCII and not a letter (a space, a
    newline, punctuation, a digit: digits are pre-tokens of their own for Qwen2.5)?"""
    return bool(data) and data[0] < 0x80 and not chr(data[0]).isalpha()


class Retokenizer:
    """Own draft tokens -> the target's tokens after committed target tokens (see the module doc)."""

    def __init__(self, own_tokenizer, target_tokenizer, own_rows: int, target_rows: int, anchor_tokens: int = 4):
        self.own_bytes, self.own_special = byte_table(own_tokenizer, own_rows)  # [V_own] bytes | None
        self.target_bytes = byte_table(target_tokenizer, target_rows)[0]  # [V_target]
        self.own_tokenizer = own_tokenizer
        self.own_byte_ids = {data[0]: o for o, data in enumerate(self.own_bytes) if data and len(data) == 1 and o not in self.own_special}
        self.target_tokenizer = target_tokenizer
        self.anchor_tokens = anchor_tokens

    def encode(self, text: str) -> list[int]:
        """The target's tokens for `text` (special tokens recognised by content, nothing added)."""
        return self.target_tokenizer.encode(text, add_special_tokens=False)

    def own_context(self, committed: list[int]) -> tuple[list[int], bytes]:
        """The drafter's context for the committed text: its own tokenizer's tokens for that text (special
        tokens by content; a partial character at the end spelled byte by byte, a byte it has no token for
        left out), as it saw text in training, not the target's tokens spelled one by one. A last token of
        white space alone is cut off and its bytes returned (token healing): it would likely merge with
        what follows (a newline with the next line's indentation), so the draft is to begin with them."""
        data = b"".join(self.target_bytes[t] or b"" for t in committed)
        text = whole_chars(data)
        own = self.own_tokenizer.encode(text.decode(), add_special_tokens=False)
        own += [self.own_byte_ids[b] for b in data[len(text) :] if b in self.own_byte_ids]
        last = self.own_bytes[own[-1]] if own else None
        if len(own) > 1 and last and not last.strip() and own[-1] not in self.own_special:
            return own[:-1], last
        return own, b""

    def draft_bytes(self, own_ids: list[int]) -> bytes:
        """The bytes own tokens spell, up to and including the first special token (an id without
        a token ends them)."""
        out = bytearray()
        for o in own_ids:
            if self.own_bytes[o] is None:
                break
            out += self.own_bytes[o]
            if o in self.own_special:
                break
        return bytes(out)

    def anchor_start(self, committed: list[int]) -> int:
        """Where the anchor starts: the latest token at or before the last `anchor_tokens` that starts
        a word or a symbol (looking a few anchors further back), else the nearest whole character."""
        last = max(len(committed) - self.anchor_tokens, 0)
        for j in range(last, max(last - 3 * self.anchor_tokens, 0) - 1, -1):
            if starts_word_or_symbol(self.target_bytes[committed[j]] or b""):
                return j
        for j in range(last, -1, -1):
            data = self.target_bytes[committed[j]]
            if data and data[0] & 0xC0 != 0x80:  # not a UTF-8 continuation byte
                return j
        return 0

    def to_target(self, committed: list[int], own_ids: list[int], n: int, heal: bytes = b"") -> list[int]:
        """Up to n target tokens that continue `committed` with the text `own_ids` spell, after the
        `heal` bytes they must begin with (none if they do not: the drafter went another way)."""
        draft = self.draft_bytes(own_ids)
        if not draft.startswith(heal):
            return []
        draft = draft[len(heal) :]
        anchor = committed[self.anchor_start(committed) :]
        pieces = [self.target_bytes[t] for t in anchor]
        if not draft or None in pieces:
            return []
        head = b"".join(pieces)
        text = whole_chars(head + draft)
        if len(text) <= len(head):
            return []
        ids = self.encode(text.decode())
        if ids[: len(anchor)] != anchor:
            return []  # the boundary does not line up: draft nothing
        new: list[int] = []
        pos = len(head)
        for t in ids[len(anchor) :]:
            data = self.target_bytes[t] if t < len(self.target_bytes) else None
            if data is None or text[pos : pos + len(data)] != data:
                break  # normalised: this token does not spell the draft's bytes
            new.append(t)
            pos += len(data)
        return new[:n]


_CACHE: dict[tuple[str, str, int, int], Retokenizer] = {}


def retokenizer(own_tokenizer, target_tokenizer, own_rows: int, target_rows: int, fingerprints: tuple[str, str] | None = None) -> Retokenizer:
    """The pair's re-tokeniser, built once per process (keyed like `vocab.vocab_map`)."""
    own_fp, target_fp = fingerprints or (tokenizer_fingerprint(own_tokenizer), tokenizer_fingerprint(target_tokenizer))
    key = (own_fp, target_fp, own_rows, target_rows)
    if key not in _CACHE:
        _CACHE[key] = Retokenizer(own_tokenizer, target_tokenizer, own_rows, target_rows)
    return _CACHE[key]
