"""The versioned state of one sequence, as the engine sees it.

A `SequenceState` is a small immutable value: the committed token ids and a version that grows by
one at every commit. Every worker call carries (seq_id, version, start position); a worker applies a
call only if its version is not older than the newest it has seen for that sequence, and a forward
at position `start` first discards whatever it cached at positions >= start. Rolling back is
therefore "call again at an earlier position", which is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class StaleVersionError(RuntimeError):
    """A call carried an older version than the worker has already seen for this sequence."""


class PositionGapError(RuntimeError):
    """A call cannot continue what the worker holds: it starts beyond the cached tokens, or the
    cached prefix differs from the caller's (its prefix hash does not match). Re-send from 0."""


@dataclass(frozen=True)
class SequenceState:
    seq_id: str
    version: int
    token_ids: tuple[int, ...]  # prompt + committed generated tokens
    prompt_len: int

    @classmethod
    def new(cls, seq_id: str, prompt_ids: list[int]) -> "SequenceState":
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        return cls(seq_id=seq_id, version=0, token_ids=tuple(prompt_ids), prompt_len=len(prompt_ids))

    def commit(self, new_tokens: list[int]) -> "SequenceState":
        return replace(self, version=self.version + 1, token_ids=self.token_ids + tuple(new_tokens))

    @property
    def generated(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_len :]


class TokenLog:
    """Token ids at positions [0, n) with a running hash of every prefix, so caller and worker can
    check in O(1) that they agree on a whole prefix before the worker builds on it."""

    _PRIME, _MASK = 1099511628211, (1 << 64) - 1

    def __init__(self, tokens: list[int] | None = None):
        self.tokens: list[int] = []
        self._hashes: list[int] = [14695981039346656037]  # _hashes[n]: hash of tokens[:n]
        self.extend(tokens or [])

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix_hash(self, n: int) -> int:
        return self._hashes[n]

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        del self._hashes[n + 1 :]

    def extend(self, tokens: list[int]) -> None:
        h = self._hashes[-1]
        for t in tokens:
            h = ((h ^ (t + 1)) * self._PRIME) & self._MASK
            self._hashes.append(h)
        self.tokens.extend(tokens)

    def put(self, start: int, tokens: list[int]) -> None:
        """Positions [start, start+len) now hold `tokens`; anything beyond is gone."""
        self.truncate(start)
        self.extend(tokens)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
