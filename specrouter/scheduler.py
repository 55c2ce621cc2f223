"""Latency model and chain search (pure functions).

For a chain M_0 -> ... -> M_N with draft lengths g_0..g_{N-1} and pairwise acceptance a_k between
M_k and M_{k+1}, level k+1 emits E_k = (1 - a_k^(g_k+1)) / (1 - a_k) tokens per verification round.
With L_0 = M_0's drafting time per token, a level's time per emitted token is

    L_{k+1} = (g_k * L_k + verify_{k+1}(g_k + 1) + overhead) / E_k

and the chain's predicted time per committed token is L_N. An `expected(drafter, verifier, g)` may
replace the i.i.d. E_k (specrouter/acceptance.py: acceptance measured position by position). Target-only decoding is the chain of one
level, L = verify_N(1) + overhead, so speculation switches itself off when it does not pay.

A batch of B sequences stepping together is the same model with batch-dependent costs: drafting a
token for all of them takes draft(level, B), a verification pass over g+1 tokens each takes
verify(level, g+1, B), and L_N is the batch's time per token per sequence, so the batch commits
B / L_N tokens per second (its goodput). Verification gets dearer as B grows (the pass does B(g+1)
tokens of work), so the best draft lengths shrink with B until target-only decoding wins.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

CostFn = Callable[[str, int], float]  # (level, block length) -> seconds for one verification pass
DraftFn = Callable[[str], float]  # level -> seconds per drafted token
AlphaFn = Callable[[str, str], float]  # (drafter, verifier) -> acceptance
ExpectedFn = Callable[[str, str, int], float]  # (drafter, verifier, g) -> tokens emitted per round
BatchCostFn = Callable[[str, int, int], float]  # (level, block length, batch) -> seconds for one batched pass
BatchDraftFn = Callable[[str, int], float]  # (level, batch) -> seconds per drafted token for the batch


@dataclass(frozen=True)
class Plan:
    chain: tuple[str, ...]  # bottom first, target last
    draft_lens: tuple[int, ...]
    predicted_s_per_token: float

    def as_dict(self) -> dict:
        return {"chain": list(self.chain), "draft_lens": list(self.draft_lens), "predicted_s_per_token": round(self.predicted_s_per_token, 5)}


def expected_tokens(alpha: float, g: int) -> float:
    """Tokens a verifier emits per round when a drafter with acceptance alpha proposes g tokens."""
    if alpha >= 1.0 - 1e-9:
        return g + 1.0
    return (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


def predict(chain: tuple[str, ...], draft_lens: tuple[int, ...], verify: CostFn, draft: DraftFn, alpha: AlphaFn, overhead: float,
            expected: ExpectedFn | None = None) -> float:
    if len(chain) == 1:
        return verify(chain[0], 1) + overhead
    latency = draft(chain[0])
    for k, g in enumerate(draft_lens):
        drafter, verifier = chain[k], chain[k + 1]
        emitted = expected(drafter, verifier, g) if expected is not None else expected_tokens(alpha(drafter, verifier), g)
        latency = (g * latency + verify(verifier, g + 1) + overhead) / emitted
    return latency


def enumerate_chains(pool: list[str], target: str, can_verify: Callable[[str], bool], max_drafters: int = 3):
    """Ordered subsets of the pool (kept in the pool's cheapest-first order) ending at the target."""
    for size in range(0, min(max_drafters, len(pool)) + 1):
        for subset in itertools.combinations(pool, size):
            if all(can_verify(level) for level in subset[1:]):
                yield subset + (target,)


def search(
    pool: list[str],
    target: str,
    verify: CostFn,
    draft: DraftFn,
    alpha: AlphaFn,
    overhead: float = 0.0,
    can_verify: Callable[[str], bool] = lambda name: True,
    lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10),
    max_drafters: int = 3,
    expected: ExpectedFn | None = None,
) -> list[Plan]:
    """Every chain and draft-length vector, best (lowest predicted time per token) first."""
    plans = []
    for chain in enumerate_chains(pool, target, can_verify, max_drafters):
        best = None
        for lens in itertools.product(lengths, repeat=len(chain) - 1):
            t = predict(chain, lens, verify, draft, alpha, overhead, expected)
            if best is None or t < best.predicted_s_per_token:
                best = Plan(chain, lens, t)
        plans.append(best)
    return sorted(plans, key=lambda p: p.predicted_s_per_token)


def goodput(plan: Plan, batch: int) -> float:
    """Committed tokens per second for a whole batch running `plan` (every sequence gets a token per L_N)."""
    return batch / plan.predicted_s_per_token


def search_batch(pool: list[str], target: str, batch: int, verify: BatchCostFn, draft: BatchDraftFn, alpha: AlphaFn, **kwargs) -> list[Plan]:
    """`search` with the costs of a batch of `batch` sequences: plans best goodput first."""
    return search(pool, target, lambda level, n: verify(level, n, batch), lambda level: draft(level, batch), alpha, **kwargs)
