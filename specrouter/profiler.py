"""Online profile of each level's cost: forward time by block length (and batch size), EMA per bucket.

Two operations are profiled per level, as the chain measures them (so remote overheads count):
- `score`: one verification pass over a block of n tokens;
- `draft`: autoregressive drafting, recorded per drafted token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def bucket(n: int) -> int:
    i = bisect.bisect_left(BUCKETS, n)
    return BUCKETS[min(i, len(BUCKETS) - 1)]


@dataclass
class _Ema:
    value: float
    count: int = 1

    def update(self, x: float, weight: float) -> None:
        # A large relative change (a slowdown, a recovery) moves the estimate at once; noise does not.
        weight = max(weight, min(0.8, abs(x - self.value) / max(self.value, 1e-9) - 0.25))
        self.value += weight * (x - self.value)
        self.count += 1


@dataclass
class ForwardProfiler:
    ema: float = 0.2  # weight of a new observation
    _score: dict[tuple[str, int, int], _Ema] = field(default_factory=dict)  # (level, bucket, batch)
    _draft: dict[tuple[str, int], _Ema] = field(default_factory=dict)  # (level, batch): seconds per token

    def observe_score(self, level: str, num_tokens: int, seconds: float, batch: int = 1, weight: float | None = None) -> None:
        if num_tokens > BUCKETS[-1]:
            return  # prefill: not a verification size
        self._update(self._score, (level, bucket(num_tokens), batch), seconds, weight)

    def observe_draft(self, level: str, num_tokens: int, seconds: float, batch: int = 1, weight: float | None = None) -> None:
        if num_tokens > 0:
            self._update(self._draft, (level, batch), seconds / num_tokens, weight)

    def _update(self, table: dict, key, x: float, weight: float | None) -> None:
        if key in table:
            table[key].update(x, self.ema if weight is None else weight)
        else:
            table[key] = _Ema(x)

    def score_time(self, level: str, num_tokens: int, batch: int = 1) -> float | None:
        """Predicted seconds for one pass over num_tokens per sequence for `batch` sequences: the
        bucket's EMA, else interpolated over block lengths, then over batch sizes."""
        batches = sorted({bt for (name, _, bt) in self._score if name == level})
        return _over_batches([(bt, self._score_at(level, num_tokens, bt)) for bt in batches], batch)

    def _score_at(self, level: str, num_tokens: int, batch: int) -> float:
        known = sorted((b, e.value) for (name, b, bt), e in self._score.items() if name == level and bt == batch)
        exact = dict(known).get(bucket(num_tokens))
        if exact is not None:
            return exact
        below = [kv for kv in known if kv[0] <= num_tokens]
        above = [kv for kv in known if kv[0] >= num_tokens]
        if below and above:
            (b0, t0), (b1, t1) = below[-1], above[0]
            return t0 + (t1 - t0) * (num_tokens - b0) / (b1 - b0) if b1 != b0 else t0
        (b0, t0) = below[-1] if below else above[0]
        return t0  # outside the profiled range: flat (verification cost grows slowly with n)

    def prefill_time(self, level: str, num_tokens: int) -> float | None:
        """Predicted seconds to prefill `num_tokens` (summed over sequences) into a level's caches: at
        the cheapest per-token rate of any profiled pass, the bulk rate a long prefill runs at."""
        rates = [e.value / (b * bt) for (name, b, bt), e in self._score.items() if name == level]
        return min(rates) * num_tokens if rates else None

    def draft_time(self, level: str, batch: int = 1) -> float | None:
        """Seconds per drafted token for `batch` sequences drafting together."""
        return _over_batches(sorted((bt, e.value) for (name, bt), e in self._draft.items() if name == level), batch)

    def observations(self, level: str) -> int:
        return sum(e.count for (name, *_), e in self._score.items() if name == level) + sum(
            e.count for (name, _), e in self._draft.items() if name == level
        )


def _over_batches(points: list[tuple[int, float]], batch: int) -> float | None:
    """Cost at `batch` from costs measured at other batch sizes [(batch, seconds)], sorted: linear
    between neighbours; past the largest measured batch, extended along the last measured slope
    (never below it); below the smallest, flat."""
    if not points:
        return None
    known = dict(points)
    if batch in known:
        return known[batch]
    below = [p for p in points if p[0] < batch]
    above = [p for p in points if p[0] > batch]
    if below and above:
        (b0, t0), (b1, t1) = below[-1], above[0]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    if above:
        return above[0][1]
    if len(below) >= 2:
        (b0, t0), (b1, t1) = below[-2], below[-1]
        return t1 + max(0.0, (t1 - t0) / (b1 - b0)) * (batch - b1)
    return below[-1][1]
