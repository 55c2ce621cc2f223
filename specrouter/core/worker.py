"""A model worker: one model view with a KV cache per sequence.

The worker is the unit that later lives in a Ray actor, so its interface is plain data in and out.
Each call runs for a batch of sequences (a single request is a batch of one), and every call in it
names its sequence id, the version it is based on and an explicit start position:
- `forward`: score a block at positions [start, start+S) (prefill and verification); a `confident`
  call also says how sure the model is of each row's most likely token;
- `draft`: the same, then sample up to k tokens autoregressively with their probabilities (stopping
  early after a token drafted with less than `min_confidence`);
- `release`: free the sequence.
Each call keeps its own version, start and prefix check, so a refused call (or a rolled-back
sequence) changes only its own sequence; the others run in the same batched passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specrouter.core.model import KVCache, KVPool, ModelView, SeqBlock
from specrouter.core.sampling import SamplingParams, most_likely, position_generator, probs_from_logits, sample
from specrouter.core.sequence import PositionGapError, StaleVersionError, TokenLog


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
class Scored:
    """One `forward` call's result."""

    p: torch.Tensor  # [num_logits, V]: the model's distribution at each scored position
    top: list[float] | None  # [num_logits] its plain-softmax probability of each row's most likely token (confident calls)


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q_draft: torch.Tensor  # [k, V]: the distribution each token was sampled from ([0, V] for a plain call)
    confidence: list[float] | None = None  # [k] how sure the drafter was of each token (see `confidence`)


def restrict(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits [N, V] with every token outside `allowed` [V] masked out (None: unchanged)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


@dataclass(frozen=True)
class ForwardCall:
    """One sequence's `forward`: cache `token_ids` at [start, start+S) (dropping anything cached beyond
    start) and return its distributions at the last `num_logits` positions. `prefix_hash` is the
    caller's TokenLog hash of positions [0, start). `confident`: also each row's top probability (a
    greedy level that verifies in the middle of a chain ends the block it passes up after a token it
    was unsure of, specrouter/core/chain.py, as it would drafting them itself)."""

    seq_id: str
    version: int
    start: int
    prefix_hash: int
    token_ids: list[int]
    num_logits: int
    params: SamplingParams
    confident: bool = False


@dataclass(frozen=True)
class DraftCall:
    """One sequence's `draft`: feed `token_ids` at `start`, then sample up to k tokens one at a time,
    stopping after one drafted with confidence below `min_confidence`; the last one is not cached. The
    stop depends only on the drafter's own draws, so the proposal stays exact. The draws come from one
    generator seeded `seed`. `plain`: the target decoding for itself (a decode run): each token drawn
    by position_generator(seed, its position), as plain decoding draws it, and returned without the
    distributions or confidences (no level verifies these tokens: q_draft is empty), never stopping unsure."""

    seq_id: str
    version: int
    start: int
    prefix_hash: int
    token_ids: list[int]
    k: int
    params: SamplingParams
    seed: int
    min_confidence: float = 0.0
    plain: bool = False


def top_confidence(logits: torch.Tensor) -> list[float]:
    """logits [N, V] -> the plain-softmax probability of each row's most likely token: how sure a greedy
    model is of the token it emits there."""
    probs = torch.softmax(logits.float(), dim=-1)  # [N, V]
    return probs.gather(-1, most_likely(logits)[:, None])[:, 0].tolist()


def confidence(logits: torch.Tensor, q: torch.Tensor, token: int, params: SamplingParams) -> float:
    """How sure the drafter was of the token it drafted: its probability under the sampling distribution
    q [1, V] (under the plain softmax of logits [1, V] when greedy, whose q is one-hot)."""
    if params.greedy:  # the token drafted is the most likely one
        return top_confidence(logits)[0]
    return float(q[0, token])


class ModelWorker:
    def __init__(self, name: str, view: ModelView):
        self.name = name
        self.view = view
        self._slots: dict[str, _Slot] = {}

    @property
    def vocab_size(self) -> int:
        return self.view.vocab_size

    @property
    def exact_width(self) -> int | None:
        """The widest pass whose rows are bit-identical to one-token passes (None: not measured)."""
        return self.view.exact_width

    @property
    def kv_pool(self) -> KVPool | None:
        """The positions and sequences the model's KV cache holds, all together (None: no shared limit)."""
        return self.view.kv_pool

    def forward(self, calls: list[ForwardCall], allowed: torch.Tensor | None = None) -> list[Scored | Exception]:
        """Every call's block in one batched pass: a Scored per call, or the StaleVersionError /
        PositionGapError that refused that call (returned, not raised; the others still run).
        `allowed` [V] bool restricts the distributions to those tokens (renormalised): a level
        drafting for another vocabulary."""
        slots = self._slots_for(calls)
        results: list[Scored | Exception] = list(slots)
        ok = [i for i, slot in enumerate(slots) if not isinstance(slot, Exception)]
        if ok:
            logits = self._run([slots[i] for i in ok], [calls[i].start for i in ok], [calls[i].token_ids for i in ok],
                               [calls[i].num_logits for i in ok])
            for i, row in zip(ok, logits):
                row = restrict(row, allowed)  # [num_logits, V]
                results[i] = Scored(probs_from_logits(row, calls[i].params), top_confidence(row) if calls[i].confident else None)
        return results

    def draft(self, calls: list[DraftCall], allowed: torch.Tensor | None = None) -> list[DraftResult | Exception]:
        """Every call's draft: one batched pass per drafted position, each sequence sampling with its own
        seeded generator (so its result does not depend on the batch); a sequence leaves the batch once
        it has its k tokens or stops unsure. A refused call returns its error, as in `forward`."""
        slots = self._slots_for(calls)
        results: list[DraftResult | Exception] = list(slots)
        live = [i for i, slot in enumerate(slots) if not isinstance(slot, Exception)]
        generators = {i: torch.Generator(device=self.view.device).manual_seed(calls[i].seed) for i in live
                      if not calls[i].plain}  # a plain call draws by position instead
        drafted: dict[int, list[int]] = {i: [] for i in live}
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        sure: dict[int, list[float]] = {i: [] for i in live}
        feeds = {i: (calls[i].start, calls[i].token_ids) for i in live}  # next (position, tokens) to run
        active = [i for i in live if calls[i].k > 0]
        while active:
            logits = self._run([slots[i] for i in active], [feeds[i][0] for i in active], [feeds[i][1] for i in active],
                               [1] * len(active))
            unsure = set()
            for i, row in zip(active, logits):
                call, row = calls[i], restrict(row, allowed)  # [1, V]
                position = feeds[i][0] + len(feeds[i][1])  # the drafted token's
                if call.plain and call.params.greedy:  # the target decoding for itself: its most likely token
                    token = int(most_likely(row)[0])
                elif call.plain:  # sampling: drawn by its position's generator, as a plain step draws it
                    generator = position_generator(call.seed, position, self.view.device)
                    token = int(sample(probs_from_logits(row, call.params), generator)[0])
                else:
                    q = probs_from_logits(row, call.params)  # [1, V]
                    token = int(sample(q, generators[i])[0])
                    rows[i].append(q)
                    sure[i].append(confidence(row, q, token, call.params))
                    if call.min_confidence and sure[i][-1] < call.min_confidence:
                        unsure.add(i)
                drafted[i].append(token)
                feeds[i] = (position, [token])
            active = [i for i in active if len(drafted[i]) < calls[i].k and i not in unsure]
        for i in live:
            q_draft = torch.cat(rows[i]) if rows[i] else torch.empty(0, self.vocab_size)
            results[i] = DraftResult(drafted[i], q_draft, None if calls[i].plain else sure[i])
        return results

    def cached_tokens(self, seq_id: str) -> list[int]:
        slot = self._slots.get(seq_id)
        return list(slot.log.tokens) if slot else []

    def cached_length(self, seq_id: str) -> int:
        return len(self.cached_tokens(seq_id))

    def release(self, seq_id: str) -> None:
        self._slots.pop(seq_id, None)

    def num_sequences(self) -> int:
        return len(self._slots)

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

    def _slots_for(self, calls: list[ForwardCall | DraftCall]) -> list[_Slot | Exception]:
        """Each call's slot, or the protocol error that refuses that call alone (nothing else changes)."""
        if len({c.seq_id for c in calls}) != len(calls):
            raise ValueError("a batch names a sequence twice")
        slots: list[_Slot | Exception] = []
        for c in calls:
            try:
                slots.append(self._slot(c.seq_id, c.version, c.start, c.prefix_hash))
            except (StaleVersionError, PositionGapError) as exc:
                slots.append(exc)
        return slots

    def _run(self, slots: list[_Slot], starts: list[int], feeds: list[list[int]], num_logits: list[int]) -> list[torch.Tensor]:
        blocks = [SeqBlock(feed, start, slot.cache, n) for slot, start, feed, n in zip(slots, starts, feeds, num_logits)]
        logits = self.view.forward_batch(blocks)  # [num_logits_b, V] each
        for slot, start, feed in zip(slots, starts, feeds):
            slot.log.put(start, feed)
        return logits
