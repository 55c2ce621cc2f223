"""Acceptance between every (drafter, verifier) pair, estimated from distribution divergence.

alpha = E[sum_x min(q_draft(x), p_target(x))] = 1 - E[TV(q_draft, p_target)]: the probability that
a drafted token is accepted. Every verification pass already has both rows, so each pass updates an
EMA per prompt class (and a pooled one across classes). Unseen pairs start from a prior.

Acceptance is not independent from one position to the next: easy stretches (boilerplate, a quoted
passage) accept long runs, hard ones reject at once, so long blocks pay more than the i.i.d. formula
(1 - a^(g+1)) / (1 - a) says. So the table also keeps, per pair and class, how often a block that
reached position j had it accepted (decayed counts, seeded at calibration), and expected tokens per
round come from these position-by-position acceptance rates, each shrunk toward alpha. A block
that holds fewer tokens than asked (an n-gram without a match, a drafter that stopped unsure) counts
its first missing position as a rejection: the verifier emits its own token there either way.

A drafter that stops unsure also costs less than its block length: the table keeps, per drafter and
class, how often a block asked for more than j tokens drafted its (j+1)-th, so the latency model
charges the tokens a block of n is expected to draft. Such a drafter proposes differently at the
bottom of a chain (where it stops) than in the middle (where it emits what it verified), so its
rounds are kept per `role` ("bottom" or ""), a role without rounds falling back to the other's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

POOLED = "*"


def pairwise_alpha(q_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """q_draft [k, V], p_target [k, V] -> [k]: sum_x min(q, p) per position (1 - total variation)."""
    return torch.minimum(q_draft, p_target).sum(-1)


MAX_POSITIONS = 16


@dataclass
class _Runs:
    """Decayed counts of verification rounds: reached[j] rounds had a block reach position j + 1 (every
    earlier token accepted), accepted[j] of them accepted it too."""

    reached: list[float] = field(default_factory=lambda: [0.0] * MAX_POSITIONS)
    accepted: list[float] = field(default_factory=lambda: [0.0] * MAX_POSITIONS)

    def add(self, num_asked: int, num_accepted: int, decay: float, weight: float = 1.0) -> None:
        for j in range(MAX_POSITIONS):
            self.reached[j] *= decay
            self.accepted[j] *= decay
        for j in range(min(num_accepted + 1, num_asked, MAX_POSITIONS)):
            self.reached[j] += weight
            self.accepted[j] += weight * (j < num_accepted)


@dataclass
class AcceptanceTable:
    ema: float = 0.05  # weight of one position's observation
    prior: float = 0.5
    prior_weight: float = 2.0  # observations' worth of trust in the fallback
    _alpha: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (class, drafter, verifier)
    _count: dict[tuple[str, str, str], int] = field(default_factory=dict)
    run_decay: float = 0.99  # per round: the position rates follow about the last 100 rounds
    run_prior_weight: float = 10.0  # rounds' worth of trust in alpha at a position
    _runs: dict[tuple[str, str, str, str], _Runs] = field(default_factory=dict)  # (class, drafter, verifier, role)
    draft_prior_weight: float = 3.0  # blocks' worth of trust that a drafter drafts every token asked
    _drafts: dict[tuple[str, str], _Runs] = field(default_factory=dict)  # (class, drafter): position j reached / drafted

    def observe(self, klass: str, drafter: str, verifier: str, alphas: list[float]) -> None:
        for key in ((klass, drafter, verifier), (POOLED, drafter, verifier)):
            value, n = self._alpha.get(key, 0.0), self._count.get(key, 0)
            for a in alphas:
                n += 1
                # the running mean until 1/ema observations, then the EMA: an early outlier (a greedy
                # first position is 0 or 1) must not anchor the estimate for hundreds of positions
                value += max(self.ema, 1.0 / n) * (a - value)
            if n:
                self._alpha[key], self._count[key] = value, n

    def observe_round(self, klass: str, drafter: str, verifier: str, num_draft: int, num_accepted: int, num_asked: int | None = None,
                      role: str = "", weight: float = 1.0) -> None:
        """One verification round's outcome: num_accepted of num_draft drafted tokens accepted, of a
        block asked for num_asked (default num_draft); `weight`: the rounds it counts for (a
        calibration's blocks count for less than rounds really run)."""
        for key in ((klass, drafter, verifier, role), (POOLED, drafter, verifier, role)):
            self._runs.setdefault(key, _Runs()).add(max(num_draft, num_asked or 0), num_accepted, self.run_decay, weight)

    def observe_draft(self, klass: str, drafter: str, num_asked: int, num_drafted: int) -> None:
        """A bottom drafter asked for num_asked tokens drafted num_drafted of them."""
        keys = {(klass, drafter), (POOLED, drafter)}
        for key in keys:
            self._drafts.setdefault(key, _Runs()).add(num_asked, min(num_drafted, num_asked), self.run_decay)

    def expected_drafted(self, klass: str, drafter: str, n: int) -> float:
        """Tokens a block asked for n is expected to draft: sum_i prod_{j <= i} c_j, with c_j the rate
        at which a block that drafted j tokens (and was asked for more) drafted another, shrunk toward
        the rate before it (the first toward 1: a drafter drafts what it is asked for until seen
        stopping). So a position beyond the blocks seen so far stops as often as the last one seen,
        not never: a drafter seen only on short blocks is not charged for long ones it would cut
        short; optimism that running the longer block then corrects."""
        runs = self._drafts.get((klass, drafter)) or self._drafts.get((POOLED, drafter))
        if runs is None:
            return float(n)
        expected, survive, rate = 0.0, 1.0, 1.0
        for j in range(n):
            if j < MAX_POSITIONS:
                rate = self._shrink(runs, j, rate, self.draft_prior_weight)
            survive *= rate
            expected += survive
        return expected

    def expected_tokens(self, klass: str, drafter: str, verifier: str, g: int, scale: float = 1.0, role: str = "") -> float:
        """Tokens a verifier emits per round for a block of g: 1 + sum_i prod_{j <= i} h_j, with h_j
        the class's acceptance rate at position j (else the pooled one's) shrunk toward alpha, times
        `scale` (a sequence's own acceptance relative to its class), capped at 1. At the bottom
        (role "bottom": a drafter that stops unsure), h_j is shrunk toward alpha or h_(j-1), whichever
        is higher: such a drafter reaches a deep position only while it is sure, so a position with
        few rounds seen is accepted at least as often as the one before it."""
        alpha = self.alpha(klass, drafter, verifier)
        other = "" if role else "bottom"
        runs = next((self._runs[key] for key in ((klass, drafter, verifier, role), (POOLED, drafter, verifier, role),
                                                  (klass, drafter, verifier, other), (POOLED, drafter, verifier, other))
                     if key in self._runs), None)
        expected, survive, rate = 1.0, 1.0, alpha
        for j in range(g):
            prior = max(alpha, rate) if role == "bottom" else alpha
            rate = self._shrink(runs, j, prior, self.run_prior_weight) if runs is not None and j < MAX_POSITIONS else prior
            survive *= min(1.0, rate * scale)
            expected += survive
        return expected

    @staticmethod
    def _shrink(runs: _Runs, j: int, prior: float, weight: float) -> float:
        return (runs.accepted[j] + weight * prior) / (runs.reached[j] + weight)

    def alpha(self, klass: str, drafter: str, verifier: str) -> float:
        """The class's estimate shrunk toward the pooled one (itself shrunk toward the prior) while it
        has few observations: (n * estimate + m * fallback) / (n + m)."""
        fallback = self._shrunk((POOLED, drafter, verifier), self.prior)
        return fallback if klass == POOLED else self._shrunk((klass, drafter, verifier), fallback)

    def _shrunk(self, key: tuple[str, str, str], fallback: float) -> float:
        n = self._count.get(key, 0)
        return (n * self._alpha[key] + self.prior_weight * fallback) / (n + self.prior_weight) if n else fallback

    def count(self, klass: str, drafter: str, verifier: str) -> int:
        return self._count.get((klass, drafter, verifier), 0)

    def snapshot(self) -> dict[str, float]:
        return {f"{k}|{d}->{v}": round(a, 4) for (k, d, v), a in sorted(self._alpha.items())}


@dataclass
class OwnAcceptance:
    """One request's own acceptance of each pair it has run: an easy prompt (boilerplate, a quoted
    passage) accepts more than its class does, a hard one less, and its plan should know."""

    _sums: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # (drafter, verifier) -> (sum of alphas, count)

    def observe(self, drafter: str, verifier: str, alphas: list[float]) -> None:
        if not alphas:  # an empty block (an n-gram without a match) says nothing of acceptance
            return
        total, n = self._sums.get((drafter, verifier), (0.0, 0))
        self._sums[(drafter, verifier)] = (total + sum(alphas), n + len(alphas))

    def alpha(self, drafter: str, verifier: str, fallback: float, weight: float = 4.0) -> float | None:
        """The request's acceptance of a pair, shrunk toward `fallback` (its class's) while it has few
        observations; None before any."""
        total, n = self._sums.get((drafter, verifier), (0.0, 0))
        return (total + weight * fallback) / (n + weight) if n else None

    def scales(self, class_alpha: Callable[[str, str], float]) -> dict[tuple[str, str], float]:
        """(drafter, verifier) -> the request's acceptance over its class's, for every pair it has run;
        `class_alpha(drafter, verifier)` gives the class's."""
        out = {}
        for pair in self._sums:
            fallback = class_alpha(*pair)
            out[pair] = self.alpha(*pair, fallback) / max(fallback, 1e-6)
        return out
