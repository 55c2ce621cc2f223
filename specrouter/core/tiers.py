"""Tiered (lossy) verification: which check a drafted token gets, by the drafter's confidence.

Opt-in and named "tiered": with thresholds tau_high >= tau_low in [0, 1], a drafted token whose drafter
confidence c (greedy: the drafter's plain-softmax probability of its most likely token, which it
drafts; sampling: its probability of the token it drew) is
- tier 1 (c >= tau_high): committed without a check;
- tier 2 (tau_low <= c < tau_high): checked, and at a disagreement regenerated, by a slim verifier (a
  skip-layer view of the target sharing its weights);
- tier 3 (c < tau_low): the block holding it goes to the full target, as lossless decoding does.
A threshold of 1 admits no token (a probability that rounds to 1.0 is not certainty), so
tau_low = tau_high = 1 is lossless decoding.

`calibrate` picks thresholds from a quality budget: measured (confidence, agreed-with-target)
observations in, the widest tiered range whose measured disagreement with the full target stays
within the budget out. A request may give such a budget (`QualityBudget`) instead of thresholds: the
generation loop then calibrates them per prompt class and drafter on the agreement it measures in the
target's own verifications (`AgreementLog`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

TIER_UNCHECKED, TIER_SLIM, TIER_TARGET = 1, 2, 3


@dataclass(frozen=True)
class Thresholds:
    tau_high: float  # tier 1 from here up (1: no tier 1)
    tau_low: float  # tier 2 from here up to tau_high (= tau_high: no tier 2)

    def __post_init__(self):
        for name, tau in (("tau_high", self.tau_high), ("tau_low", self.tau_low)):
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {tau}")
        if self.tau_low > self.tau_high:
            raise ValueError(f"tau_low must be <= tau_high, got tau_low={self.tau_low} > tau_high={self.tau_high}")

    @property
    def lossless(self) -> bool:
        """Every token goes to the full target."""
        return self.tau_low == 1.0

    @property
    def has_slim_tier(self) -> bool:
        """Some confidence falls in tier 2 (the slim verifier's)."""
        return self.tau_low < self.tau_high

    def slim_verifier(self, spec: str | None) -> str | None:
        """The slim verifier a run with these thresholds loads: `spec` ("none": none) when some tokens
        fall in tier 2, else none (nothing would run it)."""
        return spec if self.has_slim_tier and spec not in (None, "none") else None

    def tier(self, confidence: float) -> int:
        if self.tau_high < 1.0 and confidence >= self.tau_high:
            return TIER_UNCHECKED
        if self.tau_low < 1.0 and confidence >= self.tau_low:
            return TIER_SLIM
        return TIER_TARGET

    def tiers(self, confidences: Iterable[float]) -> list[int]:
        """The tier of each token of a drafted block, from the drafter's confidences."""
        return [self.tier(c) for c in confidences]


@dataclass
class TierCounts:
    """Committed tokens by the tier that decided them, for one request or summed over many. A slim
    rejection is a tier-2 token the slim verifier turned down; the token it regenerated there counts
    as tier 2. Tier 3 counts every token the full target emitted (accepted, recovered and bonus)."""

    tier1_tokens: int = 0
    tier2_tokens: int = 0
    tier3_tokens: int = 0
    slim_rejections: int = 0

    @property
    def num_tokens(self) -> int:
        return self.tier1_tokens + self.tier2_tokens + self.tier3_tokens

    def add(self, tier: int, num_tokens: int = 1) -> None:
        if tier == TIER_UNCHECKED:
            self.tier1_tokens += num_tokens
        elif tier == TIER_SLIM:
            self.tier2_tokens += num_tokens
        elif tier == TIER_TARGET:
            self.tier3_tokens += num_tokens
        else:
            raise ValueError(f"tiers are 1, 2 and 3, got {tier}")

    def __add__(self, other: "TierCounts") -> "TierCounts":
        return TierCounts(self.tier1_tokens + other.tier1_tokens, self.tier2_tokens + other.tier2_tokens,
                          self.tier3_tokens + other.tier3_tokens, self.slim_rejections + other.slim_rejections)

    def as_dict(self) -> dict:
        return {"tier1_tokens": self.tier1_tokens, "tier2_tokens": self.tier2_tokens, "tier3_tokens": self.tier3_tokens,
                "slim_rejections": self.slim_rejections}


# -- calibration from a quality budget ----------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One drafted token measured against the full target (teacher-forced on the target's own output)."""

    confidence: float  # the drafter's confidence in its token
    drafter_agreed: bool  # the drafter's token is the full target's
    slim_agreed: bool | None = None  # the slim verifier's token there is the full target's (None: not measured)


@dataclass(frozen=True)
class Calibration:
    thresholds: Thresholds
    disagreement: float  # share of tokens whose committed token would differ from the full target's
    tier_shares: tuple[float, float, float]  # share of tokens in tier 1, 2, 3
    num_observations: int

    def as_dict(self) -> dict:
        return {"tau_high": self.thresholds.tau_high, "tau_low": self.thresholds.tau_low,
                "disagreement": round(self.disagreement, 6), "tier_shares": [round(s, 6) for s in self.tier_shares],
                "num_observations": self.num_observations}


def calibrate(observations: Sequence[Observation], max_disagreement: float, grid: Sequence[float] | None = None) -> Calibration:
    """The thresholds on `grid` (default 0, 0.01, ..., 1) with the most tokens spared the full target
    (the lowest tau_low), then the most committed unchecked (the lowest tau_high), whose measured
    disagreement with the full target is at most `max_disagreement` (a share of all tokens). A tier-1
    token disagrees where the drafter did; a tier-2 token where the slim verifier did; a tier-3 token
    never. Without slim measurements there is no tier 2. tau_low = tau_high = 1 (lossless) always fits."""
    if not 0.0 <= max_disagreement <= 1.0:
        raise ValueError(f"max_disagreement must be in [0, 1], got {max_disagreement}")
    grid_arr = np.unique(np.clip(np.asarray(grid if grid is not None else np.round(np.linspace(0.0, 1.0, 101), 2), dtype=np.float64), 0.0, 1.0))
    if grid_arr[-1] != 1.0:
        grid_arr = np.append(grid_arr, 1.0)
    n = len(observations)
    if n == 0:
        return Calibration(Thresholds(1.0, 1.0), 0.0, (0.0, 0.0, 1.0), 0)
    conf = np.array([o.confidence for o in observations], dtype=np.float64)
    drafter_wrong = np.array([not o.drafter_agreed for o in observations])
    with_slim = all(o.slim_agreed is not None for o in observations)
    slim_wrong = np.array([not o.slim_agreed for o in observations]) if with_slim else np.zeros(n, dtype=bool)

    def at_or_above(mask: np.ndarray) -> np.ndarray:
        """[len(grid)]: tokens in `mask` at or above each grid threshold (a threshold of 1 admits none)."""
        ordered = np.sort(conf[mask])
        counts = len(ordered) - np.searchsorted(ordered, grid_arr, side="left")
        return np.where(grid_arr >= 1.0, 0, counts)

    tokens, drafter_errors, slim_errors = at_or_above(np.ones(n, dtype=bool)), at_or_above(drafter_wrong), at_or_above(slim_wrong)
    for lo in range(len(grid_arr)):  # lowest tau_low first: the most tokens spared the full target
        for hi in range(lo, len(grid_arr)) if with_slim else [lo]:  # then the lowest tau_high: the most unchecked
            wrong = (drafter_errors[hi] + slim_errors[lo] - slim_errors[hi]) / n
            if wrong <= max_disagreement:
                t1, t2 = int(tokens[hi]), int(tokens[lo] - tokens[hi])
                return Calibration(Thresholds(float(grid_arr[hi]), float(grid_arr[lo])), float(wrong),
                                   (t1 / n, t2 / n, (n - t1 - t2) / n), n)
    raise AssertionError("unreachable: tau_low = tau_high = 1 commits nothing unchecked")


def calibrate_classes(observations: dict[str, Sequence[Observation]], max_disagreement: float,
                      grid: Sequence[float] | None = None) -> dict[str, Calibration]:
    """`calibrate` for each prompt class (code, chat, ...) on its own observations."""
    return {klass: calibrate(obs, max_disagreement, grid) for klass, obs in observations.items()}


# -- a quality budget, calibrated online ------------------------------------------------------------------

LOG_SIZE = 4096  # drafted tokens kept per prompt class and drafter: the latest, so calibration follows the traffic
MIN_OBSERVATIONS = 200  # a budget tiers nothing for a class and drafter until the target checked this many of its tokens
RECALIBRATE_EVERY = 64  # new observations between two calibrations of the same class, drafter and budget


@dataclass(frozen=True)
class QualityBudget:
    """A request's tiered mode given as a quality budget instead of thresholds: the share of its tokens
    that may differ from the full target's. Its thresholds are calibrated per prompt class and drafter
    on the agreement the server measured (AgreementLog)."""

    max_disagreement: float

    def __post_init__(self):
        if not 0.0 <= self.max_disagreement <= 1.0:
            raise ValueError(f"max_disagreement must be in [0, 1], got {self.max_disagreement}")


class AgreementLog:
    """Per prompt class and drafter, the latest drafted tokens the full target checked in greedy
    decoding: the drafter's confidence in each and whether it was the target's token. `thresholds`
    calibrates a quality budget on them (`calibrate`, tier 1 only: a slim verifier's agreement is not
    measured while serving, so tau_low = tau_high); lossless until `min_observations` were seen."""

    def __init__(self, size: int = LOG_SIZE, min_observations: int = MIN_OBSERVATIONS):
        self.size, self.min_observations = size, min_observations
        self._log: dict[tuple[str, str], deque[Observation]] = {}
        self._seen: dict[tuple[str, str], int] = {}  # observations ever logged, per class and drafter
        self._calibrated: dict[tuple[str, str, float], tuple[int, Thresholds]] = {}  # ... -> (seen then, thresholds)

    def observe(self, klass: str, drafter: str, confidences: Sequence[float], agreed: Sequence[bool]) -> None:
        log = self._log.setdefault((klass, drafter), deque(maxlen=self.size))
        log.extend(Observation(c, a) for c, a in zip(confidences, agreed))
        self._seen[(klass, drafter)] = self._seen.get((klass, drafter), 0) + min(len(confidences), len(agreed))

    def observations(self, klass: str, drafter: str) -> list[Observation]:
        """The drafter's tokens the target checked for this class, oldest first."""
        return list(self._log.get((klass, drafter), ()))

    def thresholds(self, klass: str, drafter: str, budget: QualityBudget) -> Thresholds:
        """The widest thresholds whose disagreement with the target, measured on this class's tokens of
        this drafter, stays within the budget (lossless until enough were measured)."""
        key, seen = (klass, drafter), self._seen.get((klass, drafter), 0)
        if len(self._log.get(key, ())) < self.min_observations:
            return Thresholds(1.0, 1.0)
        cached = self._calibrated.get((*key, budget.max_disagreement))
        if cached is None or seen - cached[0] >= RECALIBRATE_EVERY:
            cached = (seen, calibrate(self.observations(klass, drafter), budget.max_disagreement).thresholds)
            self._calibrated[(*key, budget.max_disagreement)] = cached
        return cached[1]
