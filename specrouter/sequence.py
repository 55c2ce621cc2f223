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
    """A call started beyond the tokens the worker holds for this sequence (it must re-prefill)."""


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
