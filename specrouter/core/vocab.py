"""Token-level intersection of two byte-level BPE vocabularies (Timor et al., ICML 2025).

A chain speaks its target's token ids. A level whose tokenizer differs from the target's ("own"
vocabulary) is restricted to the tokens both vocabularies spell identically, so every token it emits
is exactly one target token and its distribution lives on the target's vocabulary: the ordinary
rejection sampler stays exact, and the level's rows pass upward unchanged. Its context is the
target's tokens translated one by one into own ids (shared tokens map to themselves; any other
token is spelled with the own BPE model over the same bytes, partial UTF-8 included), which is
prefix-stable, so rollback by position stays idempotent.

Both tokenizers must be byte-level BPE (GPT-2's byte -> unicode alphabet), so their vocabulary
strings compare directly. Special tokens are matched by content among special tokens only
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are shared by SmolLM2 and Qwen2.5).
The map is computed once per (own, target) tokenizer pair and row counts, and cached in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache

import torch


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, shared by every byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(token: str, special: bool) -> bytes:
    """The bytes a vocabulary entry stands for (a special token stands for its content)."""
    if special:
        return token.encode()
    decode = unicode_to_bytes()
    return bytes(decode[c] for c in token)


@dataclass(frozen=True)
class VocabMap:
    """Own vocabulary -> target vocabulary. Shapes: V_own / V_target are the models' row counts
    (a model's head may have more rows than its tokenizer has tokens)."""

    shared_own: torch.Tensor  # [S] long: own ids of the shared tokens
    shared_target: torch.Tensor  # [S] long: the same tokens' target ids
    spellings: tuple[tuple[int, ...], ...]  # [V_target]: own ids spelling each target token's bytes
    own_rows: int
    target_rows: int
    own_vocab: int  # tokens in the own tokenizer
    target_vocab: int  # tokens in the target tokenizer
    num_lossy: int = 0  # target tokens holding a byte the own vocabulary cannot spell
    build_s: float = 0.0

    def __post_init__(self):
        to_target = [-1] * self.own_rows
        for o, t in zip(self.shared_own.tolist(), self.shared_target.tolist()):
            to_target[o] = t
        object.__setattr__(self, "_to_target", to_target)
        allowed = torch.zeros(self.own_rows, dtype=torch.bool)
        allowed[self.shared_own] = True
        object.__setattr__(self, "allowed", allowed)  # [V_own]: what the level may emit

    @property
    def num_shared(self) -> int:
        return len(self.shared_own)

    def to_own(self, target_ids: list[int]) -> tuple[list[int], list[int]]:
        """Target ids -> (own ids, ends): ends[j] = number of own ids spelling target_ids[: j + 1]."""
        own: list[int] = []
        ends: list[int] = []
        for t in target_ids:
            own.extend(self.spellings[t])
            ends.append(len(own))
        return own, ends

    def tokens_to_target(self, own_ids: list[int]) -> list[int]:
        """Shared own ids -> target ids (anything else is a bug: the level may emit shared tokens only)."""
        out = [self._to_target[o] for o in own_ids]
        if -1 in out:
            raise ValueError(f"own tokens {[o for o, t in zip(own_ids, out) if t < 0]} are not shared with the target")
        return out

    def rows_to_target(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, V_own], zero off the shared tokens -> [N, V_target]."""
        out = torch.zeros(rows.shape[0], self.target_rows, dtype=rows.dtype)
        out[:, self.shared_target] = rows[:, self.shared_own]
        return out

    def report(self) -> dict:
        return {
            "own_vocab": self.own_vocab,
            "target_vocab": self.target_vocab,
            "num_shared": self.num_shared,
            "coverage_of_own": round(self.num_shared / self.own_vocab, 4),
            "coverage_of_target": round(self.num_shared / self.target_vocab, 4),
            "num_lossy_spellings": self.num_lossy,
            "build_s": round(self.build_s, 3),
        }


def _entries(tokenizer) -> tuple[dict[tuple[bool, str], int], object]:
    """(is_special, string) -> id for every token, and the BPE model that spells bytes. Some
    vocabularies lack a few byte tokens (SmolLM2: bytes that never occur in UTF-8 text, a few control
    bytes); a target token holding one is spelled without it (context only, counted as lossy)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ != "BPE" or "ByteLevel" not in repr(backend.pre_tokenizer):
        raise ValueError(f"{type(tokenizer).__name__}: cross-tokenizer levels need byte-level BPE tokenizers")
    special = tokenizer.get_added_vocab()
    entries = {(True, s): i for s, i in special.items()}
    entries.update(((False, s), i) for s, i in backend.get_vocab(with_added_tokens=False).items() if s not in special)
    return entries, model


def byte_table(tokenizer, rows: int) -> tuple[tuple[bytes | None, ...], frozenset[int]]:
    """([rows] the bytes each id stands for, None for rows without a token; the special tokens' ids)."""
    entries, _ = _entries(tokenizer)
    table: list[bytes | None] = [None] * rows
    for (special, text), i in entries.items():
        if i < rows:
            table[i] = token_bytes(text, special)
    return tuple(table), frozenset(i for (special, _), i in entries.items() if special and i < rows)


def build_vocab_map(own_tokenizer, target_tokenizer, own_rows: int, target_rows: int) -> VocabMap:
    t0 = time.perf_counter()
    own, own_bpe = _entries(own_tokenizer)
    target, _ = _entries(target_tokenizer)
    own_ids_fit = {key: i for key, i in own.items() if i < own_rows}
    shared = sorted((own_ids_fit[key], t) for key, t in target.items() if key in own_ids_fit and t < target_rows)
    by_target = {t: o for o, t in shared}
    fallback = (own_tokenizer.eos_token_id or 0,)  # spells what the own vocabulary cannot (context only)
    spellings: list[tuple[int, ...]] = [fallback] * target_rows  # rows without a token: only ever context
    to_unicode = bytes_to_unicode()
    spellable = {c for c in to_unicode.values() if (False, c) in own}
    lossy = 0
    for (special, text), t in target.items():
        if t >= target_rows:
            continue
        if t in by_target:
            spellings[t] = (by_target[t],)
        else:
            byte_level = "".join(to_unicode[b] for b in token_bytes(text, special))
            spellings[t] = tuple(piece.id for piece in own_bpe.tokenize(byte_level)) or fallback
            lossy += not spellable.issuperset(byte_level)
    return VocabMap(
        shared_own=torch.tensor([o for o, _ in shared], dtype=torch.long),
        shared_target=torch.tensor([t for _, t in shared], dtype=torch.long),
        spellings=tuple(spellings),
        own_rows=own_rows,
        target_rows=target_rows,
        own_vocab=len(own),
        target_vocab=len(target),
        num_lossy=lossy,
        build_s=time.perf_counter() - t0,
    )


_CACHE: dict[tuple[str, str, int, int], VocabMap] = {}


def vocab_map(own_tokenizer, target_tokenizer, own_rows: int, target_rows: int, fingerprints: tuple[str, str] | None = None) -> VocabMap:
    """The pair's map, built once per process (keyed by both tokenizers' fingerprints and row counts)."""
    own_fp, target_fp = fingerprints or (tokenizer_fingerprint(own_tokenizer), tokenizer_fingerprint(target_tokenizer))
    key = (own_fp, target_fp, own_rows, target_rows)
    if key not in _CACHE:
        _CACHE[key] = build_vocab_map(own_tokenizer, target_tokenizer, own_rows, target_rows)
    return _CACHE[key]
