"""Text-level re-tokenised drafting across tokenizers, for greedy requests.

The intersection (specrouter/vocab.py) keeps a drafter on another tokenizer exact for sampling, but
caps what it can propose. At temperature 0 a verifier needs only a guess: a block whose q_draft is
one-hot on each proposed token is accepted exactly where the verifier's argmax agrees, so the output
stays token-identical to the target alone, whatever the guess. So the drafter drafts freely in its
own vocabulary, its tokens become bytes, and the bytes become the target's tokens, in context:

1. anchor: the last few committed target tokens, starting at a token that begins a word or a symbol
   (a likely pre-token boundary of the target's tokenizer) on a whole UTF-8 character;
2. re-tokenise anchor bytes + draft bytes with the target's tokenizer, the draft cut after its first
   special token (special tokens map by content) and the text after its last whole character;
3. go on only if that reproduces the anchor's tokens exactly: then the new tokens start on the
   committed boundary (otherwise a token would straddle it, or the committed tail is not what the
   tokenizer gives for its text, and nothing is drafted);
4. keep new tokens while their bytes spell the draft's (the tokenizer may normalise the text), drop
   the last one unless it is special (more text could still merge into it), keep at most n.

Both tokenizers must be byte-level BPE (as for the intersection). A re-tokeniser is built once per
(own, target) tokenizer pair and row counts, and cached in memory.
"""

from __future__ import annotations

from specrouter.vocab import byte_table, tokenizer_fingerprint


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
        self.target_bytes, self.target_special = byte_table(target_tokenizer, target_rows)  # [V_target]
        self.target_tokenizer = target_tokenizer
        self.anchor_tokens = anchor_tokens

    def encode(self, text: str) -> list[int]:
        """The target's tokens for `text` (special tokens recognised by content, nothing added)."""
        return self.target_tokenizer.encode(text, add_special_tokens=False)

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

    def to_target(self, committed: list[int], own_ids: list[int], n: int) -> list[int]:
        """Up to n target tokens that continue `committed` with the text `own_ids` spell."""
        draft = self.draft_bytes(own_ids)
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
        if new and new[-1] not in self.target_special:
            new.pop()  # more text could still merge into the last token
        return new[:n]


_CACHE: dict[tuple[str, str, int, int], Retokenizer] = {}


def retokenizer(own_tokenizer, target_tokenizer, own_rows: int, target_rows: int, fingerprints: tuple[str, str] | None = None) -> Retokenizer:
    """The pair's re-tokeniser, built once per process (keyed like `vocab.vocab_map`)."""
    own_fp, target_fp = fingerprints or (tokenizer_fingerprint(own_tokenizer), tokenizer_fingerprint(target_tokenizer))
    key = (own_fp, target_fp, own_rows, target_rows)
    if key not in _CACHE:
        _CACHE[key] = Retokenizer(own_tokenizer, target_tokenizer, own_rows, target_rows)
    return _CACHE[key]
