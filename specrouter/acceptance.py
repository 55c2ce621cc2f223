"""Acceptance between every (drafter, verifier) pair, estimated from distribution divergence.

alpha = E[sum_x min(q_draft(x), p_target(x))] = 1 - E[TV(q_draft, p_target)]: the probability that
a drafted token is accepted. Every verification pass already has both rows, so each pass updates an
EMA per prompt class (and a pooled one across classes). Unseen pairs start from a prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POOLED = "*"


def pairwise_alpha(q_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """q_draft [k, V], p_target [k, V] -> [k]: sum_x min(q, p) per position (1 - total variation)."""
    return torch.minimum(q_draft, p_target).sum(-1)


@dataclass
class AcceptanceTable:
    ema: float = 0.05  # weight of one position's observation
    prior: float = 0.5
    prior_weight: float = 2.0  # observations' worth of trust in the fallback
    _alpha: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (class, drafter, verifier)
    _count: dict[tuple[str, str, str], int] = field(default_factory=dict)

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
