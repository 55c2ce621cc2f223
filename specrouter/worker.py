"""A model worker: one model view with a KV cache per sequence.

The worker is the unit that later lives in a Ray actor, so its interface is plain data in and out:
every call names the sequence id, the version it is based on and an explicit start position.
- `forward`: score a block at positions [start, start+S) in one pass (prefill and verification);
- `draft`: the same, then sample k tokens autoregressively with their probabilities;
- `truncate`: roll the sequence back to a position (idempotent);
- `release`: free the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specrouter.model import KVCache, ModelView
from specrouter.sampling import SamplingParams, probs_from_logits, sample
from specrouter.sequence import PositionGapError, StaleVersionError, TokenLog


class WorkerUnavailable(RuntimeError):
    """A worker did not answer (dead, restarting, or past its deadline)."""

    def __init__(self, level: str, reason: str):
        super().__init__(f"worker {level!r} unavailable: {reason}")
        self.level = level


@dataclass
class _Slot:
    cache: KVCache
    log: TokenLog = field(default_factory=TokenLog)  # the tokens whose keys/values the cache holds
    version: int = 0


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q_draft: torch.Tensor  # [k, V]: the distribution each token was sampled from


def restrict(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits [N, V] with every token outside `allowed` [V] masked out (None: unchanged)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


class ModelWorker:
    def __init__(self, name: str, view: ModelView):
        self.name = name
        self.view = view
        self._slots: dict[str, _Slot] = {}

    @property
    def vocab_size(self) -> int:
        return self.view.vocab_size

    def _slot(self, seq_id: str, version: int, start: int, prefix_hash: int) -> _Slot:
        """The sequence's slot, if the call may build on it: not stale, no gap, same prefix."""
        slot = self._slots.get(seq_id)
        if slot is None:
            slot = self._slots[seq_id] = _Slot(self.view.new_cache(), version=version)
        if version < slot.version:
            raise StaleVersionError(f"{self.name}: {seq_id} version {version} < current {slot.version}")
        if start > len(slot.log):
            raise PositionGapError(f"{self.name}: {seq_id} start {start} beyond cached length {len(slot.log)}")
        if slot.log.prefix_hash(start) != prefix_hash:
            raise PositionGapError(f"{self.name}: {seq_id} holds a different prefix before position {start}")
        slot.version = version
        return slot

    def _run(self, slot: _Slot, start: int, token_ids: list[int], num_logits: int) -> torch.Tensor:
        logits = self.view.forward(token_ids, start, slot.cache, num_logits)  # [num_logits, V]
        slot.log.put(start, token_ids)
        return logits

    def forward(
        self,
        seq_id: str,
        version: int,
        start: int,
        prefix_hash: int,
        token_ids: list[int],
        num_logits: int,
        params: SamplingParams,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cache `token_ids` at [start, start+S) (dropping anything cached beyond start) -> p [num_logits, V].
        `prefix_hash` is the caller's TokenLog hash of positions [0, start). `allowed` [V] bool restricts
        the distribution to those tokens (renormalised): a level drafting for another vocabulary."""
        slot = self._slot(seq_id, version, start, prefix_hash)
        return probs_from_logits(restrict(self._run(slot, start, token_ids, num_logits), allowed), params)

    def draft(
        self,
        seq_id: str,
        version: int,
        start: int,
        prefix_hash: int,
        token_ids: list[int],
        k: int,
        params: SamplingParams,
        seed: int,
        allowed: torch.Tensor | None = None,
    ) -> DraftResult:
        """Feed `token_ids` at `start`, then sample k tokens one at a time (among `allowed` only, if
        given); the last one is not cached."""
        slot = self._slot(seq_id, version, start, prefix_hash)
        generator = torch.Generator(device=self.view.device).manual_seed(seed)
        drafted, rows = [], []
        feed, pos = token_ids, start
        for _ in range(k):
            q = probs_from_logits(restrict(self._run(slot, pos, feed, 1), allowed), params)  # [1, V]
            token = int(sample(q, generator)[0])
            drafted.append(token)
            rows.append(q)
            pos, feed = pos + len(feed), [token]
        q_draft = torch.cat(rows) if rows else torch.empty(0, self.vocab_size)
        return DraftResult(drafted, q_draft)

    def truncate(self, seq_id: str, version: int, position: int) -> int:
        """Forget positions >= `position`; repeating it (or truncating beyond the end) is a no-op."""
        slot = self._slots.get(seq_id)
        if slot is None:
            return 0
        if version < slot.version:
            raise StaleVersionError(f"{self.name}: {seq_id} version {version} < current {slot.version}")
        slot.version = version
        slot.log.truncate(min(len(slot.log), position))
        return len(slot.log)

    def cached_tokens(self, seq_id: str) -> list[int]:
        slot = self._slots.get(seq_id)
        return list(slot.log.tokens) if slot else []

    def cached_length(self, seq_id: str) -> int:
        return len(self.cached_tokens(seq_id))

    def release(self, seq_id: str) -> None:
        self._slots.pop(seq_id, None)

    def num_sequences(self) -> int:
        return len(self._slots)
