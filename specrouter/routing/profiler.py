"""Online profile of each level's cost: forward time by block length (and batch size), EMA per bucket.

Three operations are profiled per level, as the chain measures them (so remote overheads count):
- `score`: one verification pass over a block of n tokens;
- `draft`: autoregressive drafting, by the tokens a call drafted: a call costs a share of its own
  (a remote call, a cross-tokenizer level's conversions) besides its tokens, which makes short
  blocks dearer a token than long ones;
- `prefill`: caching context a level has not seen (a drafter catching up after steps out of the
  chain, a pass longer than any block), recorded per token: what a plan that brings a far-behind
  drafter back pays first.

Each level also has a speed factor that multiplies all of its costs. Two observations in a row that
are both far off their predictions in the same direction (a level slowed down or recovered, say its
device got busy) move it, so every block length and batch size follows at once, not only the ones
that happen to run; a single outlier (a pause) moves only its own bucket. A level that runs on
another's device (a skip-layer view of the target's weights: `share`) follows that level's changes
too, so it needs no passes of its own to stay up to date while the other runs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
LEVEL_CHANGE = 1.5  # an observation this many times off its prediction (or 1/this) may be a level-wide change
# ... and at least this many seconds off: a level that costs next to nothing (prompt lookup) is often
# several times off in either direction from noise alone; counting that as a change would make every route
# re-plan at once and walk its speed factor toward zero, to no purpose: such a level never decides a plan
MIN_CHANGE_S = 0.002


def bucket(n: int) -> int:
    i = bisect.bisect_left(BUCKETS, n)
    return BUCKETS[min(i, len(BUCKETS) - 1)]


@dataclass
class _Ema:
    value: float

    def update(self, x: float, weight: float) -> None:
        self.value += weight * (x - self.value)


@dataclass
class ForwardProfiler:
    ema: float = 0.2  # weight of a new observation
    _score: dict[tuple[str, int, int], _Ema] = field(default_factory=dict)  # (level, bucket, batch)
    _draft: dict[tuple[str, int, int], _Ema] = field(default_factory=dict)  # (level, tokens drafted, batch): seconds a call
    _prefill: dict[str, _Ema] = field(default_factory=dict)  # level: seconds per context token cached
    # Both tables hold costs divided by the level's speed factor at the time; predictions multiply it back.
    _speed: dict[str, float] = field(default_factory=dict)
    # per level: its last observation over its prediction, which entry saw it, and that entry's value before
    _last: dict[str, tuple[float, tuple, float]] = field(default_factory=dict)
    changes: int = 0  # level-wide changes seen so far (a plan made before the last one is out of date)
    _hosts: dict[str, str] = field(default_factory=dict)  # level -> the level whose device (worker) it runs on

    def share(self, level: str, host: str) -> None:
        """`level` runs on `host`'s device: a level-wide change of host's costs is level's too."""
        self._hosts[level] = host

    def observe_score(self, level: str, num_tokens: int, seconds: float, batch: int = 1, weight: float | None = None) -> None:
        if num_tokens > BUCKETS[-1]:  # not a verification size: a pass that also caches context
            self.observe_prefill(level, num_tokens * batch, seconds)
            return
        self._update(self._score, (level, bucket(num_tokens), batch), seconds, weight)

    def observe_prefill(self, level: str, num_tokens: int, seconds: float) -> None:
        """`num_tokens` of context (all sequences together) cached by `level` in `seconds`."""
        if num_tokens > 0 and seconds > 0:
            rate = seconds / num_tokens / self.speed(level)
            self._prefill.setdefault(level, _Ema(rate)).update(rate, self.ema)  # the first: itself

    def observe_draft(self, level: str, num_tokens: int, seconds: float, batch: int = 1, weight: float | None = None) -> None:
        """A drafting call of `level` that drafted `num_tokens` (per sequence) in `seconds`."""
        if num_tokens > 0:
            self._update(self._draft, (level, num_tokens, batch), seconds, weight)

    def _update(self, table: dict, key, x: float, weight: float | None) -> None:
        level = key[0]
        speed = self.speed(level)
        if key not in table:
            table[key] = _Ema(x / speed)
            return
        entry = table[key]
        ratio = x / (entry.value * speed) if entry.value > 0 and x > 0 else 1.0
        if abs(x - entry.value * speed) < MIN_CHANGE_S:
            ratio = 1.0  # off by next to nothing: as predicted
        last = self._last.get(level)
        self._last[level] = (ratio, key, entry.value)
        if _far(ratio) and last is not None and _far(last[0]) and (ratio > 1) == (last[0] > 1):
            # Confirmed: the level changed as a whole. (If the same entry saw the first observation,
            # undo the EMA step it took, so the change is counted once, in the speed factor.)
            if last[1] == key:
                entry.value = last[2]
                ratio = x / (entry.value * speed)
            self._speed[level] = self._speed.get(level, 1.0) * math.sqrt(ratio * last[0])
            self._last.pop(level)
            self.changes += 1
        entry.update(x / self.speed(level), self.ema if weight is None else weight)  # far and alone: an EMA step

    def speed(self, level: str) -> float:
        """The level's cost multiplier (1.0 until a level-wide change was seen, of it or of its host)."""
        host = self._hosts.get(level)
        return self._speed.get(level, 1.0) * (self.speed(host) if host is not None else 1.0)

    def score_time(self, level: str, num_tokens: int, batch: int = 1) -> float | None:
        """Predicted seconds for one pass over num_tokens per sequence for `batch` sequences: the
        bucket's EMA, else interpolated over block lengths, then over batch sizes."""
        batches = sorted({bt for (name, _, bt) in self._score if name == level})
        return _scaled(_interpolated([(bt, self._score_at(level, num_tokens, bt)) for bt in batches], batch), self.speed(level))

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
        the rate its prefills ran at, else the cheapest per-token rate of any profiled pass (a guess
        that can be well below the real rate: a short pass's rows are not a long prefill's)."""
        if level in self._prefill:
            return self._prefill[level].value * num_tokens * self.speed(level)
        rates = [e.value / (b * bt) for (name, b, bt), e in self._score.items() if name == level]
        return min(rates) * num_tokens * self.speed(level) if rates else None

    def draft_time(self, level: str, num_tokens: float = 1.0, batch: int = 1) -> float | None:
        """Predicted seconds for `batch` sequences to draft `num_tokens` each (an expected block
        length may be fractional) in one call: linear between the lengths drafted, along the line
        through the nearest two beyond them (a longer block costs at least what the longest seen
        does; a shorter one at most what the shortest does and at least its tokens' share of it: a
        call's own share is not negative), in proportion where one length alone was seen."""
        batches = sorted({bt for (name, _, bt) in self._draft if name == level})
        return _scaled(_interpolated([(bt, self._draft_at(level, num_tokens, bt)) for bt in batches], batch), self.speed(level))

    def _draft_at(self, level: str, num_tokens: float, batch: int) -> float:
        known = sorted((n, e.value) for (name, n, bt), e in self._draft.items() if name == level and bt == batch)
        (n0, t0) = known[0]
        if len(known) == 1:
            return t0 * num_tokens / n0
        if num_tokens >= n0:
            return _interpolated(known, num_tokens)
        (n1, t1) = known[1]
        line = t0 + (t1 - t0) * (num_tokens - n0) / (n1 - n0)
        return min(max(line, t0 * num_tokens / n0), t0)  # shorter: cheaper, but by no more than its tokens' share

def _far(ratio: float) -> bool:
    return ratio > LEVEL_CHANGE or ratio < 1 / LEVEL_CHANGE


def _scaled(seconds: float | None, speed: float) -> float | None:
    return None if seconds is None else seconds * speed


def _interpolated(points: list[tuple[float, float]], x: float) -> float | None:
    """Cost at `x` (a batch size, a block length) from costs measured at others [(x, seconds)],
    sorted: linear between neighbours; past the largest measured, extended along the last measured
    slope (never below it); below the smallest, flat."""
    if not points:
        return None
    known = dict(points)
    if x in known:
        return known[x]
    below = [p for p in points if p[0] < x]
    above = [p for p in points if p[0] > x]
    if below and above:
        (b0, t0), (b1, t1) = below[-1], above[0]
        return t0 + (t1 - t0) * (x - b0) / (b1 - b0)
    if above:
        return above[0][1]
    if len(below) >= 2:
        (b0, t0), (b1, t1) = below[-2], below[-1]
        return t1 + max(0.0, (t1 - t0) / (b1 - b0)) * (x - b1)
    return below[-1][1]
