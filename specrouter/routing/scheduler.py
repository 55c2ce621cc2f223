"""Latency model and chain search (pure functions).

For a chain M_0 -> ... -> M_N with draft lengths g_0..g_{N-1} and pairwise acceptance a_k between
M_k and M_{k+1}, level k+1 emits E_k(g) = (1 - a_k^(g+1)) / (1 - a_k) tokens per verification round
of a block of g. Time per committed token is one top round over the tokens it emits,

    L_N = (C_{N-1}(g_{N-1}) + verify_N(g_{N-1} + 1) + overhead) / E_{N-1}(g_{N-1}),

where C_k(n) is the time level k takes to propose n tokens. D_k(n) is the tokens a block of level k
asked for n holds (n, unless a `drafted(level, n)` says it stops early: an n-gram without a match, a
model that ends its blocks unsure, at any level). The level above then verifies D_k(n) + 1 tokens, and
verify_N(g + 1) above stands for that pass's cost expected over D's distribution: the increments
D_k(m) - D_k(m - 1) are the chances that a block holds at least m tokens. A pass's cost is not linear
in its rows (on a CPU it jumps where a kernel changes tiles) and an n-gram's block is mostly all or
nothing, so the pass over the average block is not the average pass. At the bottom
C_0(n) = draft_0(D_0(n)), a drafting call's cost by the tokens it drafts (a call has a cost of its
own, so a token of a short block costs more than one of a long block); above it, rounds as the
engine runs them (specrouter/core/chain.py `propose`) until D_k(n) tokens are out: each asks the
level below for r = min(g_{k-1}, n_left - 1) tokens (the level adds one of its own), costs
C_{k-1}(r) + verify_k(r + 1) + overhead and yields E_{k-1}(r) tokens; the last round is charged in
proportion to the tokens still needed. So a level asked for one token scores it alone, with no help
from below. An `expected(drafter, verifier, g)` may replace the i.i.d. E_k
(specrouter/routing/acceptance.py: acceptance measured position by position). Target-only decoding
is the chain of one level, L = verify_N(1) + overhead, so speculation switches itself off when it
does not pay.

A batch of B sequences stepping together is the same model with batch-dependent costs: drafting n
tokens for all of them takes draft(level, n, B), a verification pass over g+1 tokens each takes
verify(level, g+1, B), and L_N is the batch's time per token per sequence, so the batch commits
B / L_N tokens per second (its goodput): `search` with the costs at batch B ranks plans by goodput,
and at B = 1 it is the search for a request alone. Verification gets dearer as B grows (the pass
does B(g+1) tokens of work), so the best draft lengths shrink with B until target-only decoding wins.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

CostFn = Callable[[str, int], float]  # (level, block length) -> seconds for one verification pass
DraftFn = Callable[[str, float], float]  # (level, tokens) -> seconds for one call drafting that many
AlphaFn = Callable[[str, str], float]  # (drafter, verifier) -> acceptance
ExpectedFn = Callable[[str, str, int], float]  # (drafter, verifier, g) -> tokens emitted per round
DraftedFn = Callable[[str, int], float]  # (level, n asked) -> tokens its block is expected to hold: the sum
# over m = 1..n of the chance that it holds at least m (a block asked for n stops where one asked for more would)


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
            expected: ExpectedFn | None = None, drafted: DraftedFn | None = None) -> float:
    return _ChainModel(chain, verify, draft, alpha, overhead, expected, drafted).s_per_token(draft_lens)


class _ChainModel:
    """The latency model of one chain; C_k(n) memoised over every draft-length vector searched."""

    def __init__(self, chain: tuple[str, ...], verify: CostFn, draft: DraftFn, alpha: AlphaFn, overhead: float,
                 expected: ExpectedFn | None, drafted: DraftedFn | None = None):
        self.chain, self.verify, self.draft, self.alpha, self.overhead, self.expected = chain, verify, draft, alpha, overhead, expected
        self.drafted = drafted
        self._emitted: dict[tuple[int, int], float] = {}
        self._propose: dict[tuple[int, tuple[int, ...], int], float] = {}
        self._verify: dict[tuple[int, int], float] = {}

    def s_per_token(self, draft_lens: tuple[int, ...]) -> float:
        chain = self.chain
        if len(chain) == 1:
            return self.verify(chain[0], 1) + self.overhead
        top, g = len(chain) - 1, draft_lens[-1]
        return (self.propose_time(top - 1, draft_lens, g) + self.verify_time(top, g) + self.overhead) / self.emitted(top, g)

    def held(self, k: int, n: int) -> float:
        """D_k(n): tokens in a block level k proposes when asked for n (all n, but for a level that stops early)."""
        return n if self.drafted is None or n == 0 else self.drafted(self.chain[k], n)

    def verify_time(self, k: int, n: int) -> float:
        """Seconds level k takes to verify what level k - 1 proposes when asked for n: its pass over the
        block and one token more, expected over the block's length D_(k-1)(n) (a block of m with
        chance P(D >= m) - P(D >= m + 1), P(D >= m) = D(m) - D(m - 1))."""
        if self.drafted is None or n == 0:
            return self.verify(self.chain[k], n + 1)
        if (k, n) not in self._verify:
            at_least = [1.0]  # [n + 2]: chance the block holds at least m tokens
            for m in range(1, n + 1):
                at_least.append(min(at_least[-1], max(0.0, self.held(k - 1, m) - self.held(k - 1, m - 1))))
            at_least.append(0.0)
            self._verify[(k, n)] = sum((at_least[m] - at_least[m + 1]) * self.verify(self.chain[k], m + 1) for m in range(n + 1))
        return self._verify[(k, n)]

    def emitted(self, k: int, g: int) -> float:
        """Tokens level k emits per round of a block of g from level k - 1: at most the block it
        verifies plus one, D_(k-1)(g) + 1 (acceptance and the blocks held are estimated apart, and
        for a drafter seen little they can disagree)."""
        if (k, g) not in self._emitted:
            drafter, verifier = self.chain[k - 1], self.chain[k]
            tokens = (self.expected(drafter, verifier, g) if self.expected is not None
                      else expected_tokens(self.alpha(drafter, verifier), g))
            self._emitted[(k, g)] = min(tokens, self.held(k - 1, g) + 1.0)
        return self._emitted[(k, g)]

    def propose_time(self, k: int, draft_lens: tuple[int, ...], n: int) -> float:
        """C_k(n): seconds for level k to propose n tokens (it depends on draft_lens[:k] only)."""
        if k == 0:
            held = self.held(0, n)
            return self.draft(self.chain[0], held) if held > 0 else 0.0
        key = (k, draft_lens[:k], n)
        if key not in self._propose:
            seconds, left = 0.0, float(self.held(k, n))
            while left > 1e-9:
                r = min(draft_lens[k - 1], max(0, math.ceil(left - 1e-9) - 1))
                tokens = self.emitted(k, r)
                round_s = self.propose_time(k - 1, draft_lens, r) + self.verify_time(k, r) + self.overhead
                seconds += round_s * min(1.0, left / tokens)
                left -= tokens
            self._propose[key] = seconds
        return self._propose[key]


def enumerate_chains(pool: list[str], target: str, can_verify: Callable[[str], bool], max_drafters: int = 3,
                     stacks: Callable[[str, str], bool] = lambda lower, upper: True):
    """Ordered subsets of the pool (kept in the pool's cheapest-first order) ending at the target,
    where every level above the bottom can verify and `stacks(lower, upper)` for every neighbours."""
    for size in range(0, min(max_drafters, len(pool)) + 1):
        for subset in itertools.combinations(pool, size):
            chain = subset + (target,)
            if all(can_verify(level) for level in subset[1:]) and all(stacks(a, b) for a, b in zip(chain, chain[1:])):
                yield chain


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
    drafted: DraftedFn | None = None,
    fixed: dict[str, int] | None = None,
    max_top_len: int | None = None,
    own_lengths: dict[str, tuple[int, ...]] | None = None,
    stacks: Callable[[str, str], bool] = lambda lower, upper: True,
) -> list[Plan]:
    """Every chain and draft-length vector, best (lowest predicted time per token) first; a level in
    `fixed` always proposes blocks of its length there (no search), one in `own_lengths` is searched
    over lengths of its own (else `lengths`); the target verifies blocks of at most `max_top_len`
    (its bit-exact width; None: any)."""
    verify, draft = functools.cache(verify), functools.cache(draft)  # profile lookups, shared by every chain
    drafted = functools.cache(drafted) if drafted is not None else None
    plans = []
    for chain in enumerate_chains(pool, target, can_verify, max_drafters, stacks):
        best = None
        model = _ChainModel(chain, verify, draft, alpha, overhead, expected, drafted)
        choices = [(fixed[d],) if fixed and d in fixed else (own_lengths or {}).get(d, lengths) for d in chain[:-1]]
        if max_top_len is not None and choices:
            choices[-1] = tuple(sorted({min(g, max_top_len) for g in choices[-1]}))
        if max_top_len == 0 and len(chain) > 1:
            continue  # the target verifies no block bit-exactly: target-only decoding alone
        for lens in itertools.product(*choices):
            t = model.s_per_token(lens)
            if best is None or t < best.predicted_s_per_token:
                best = Plan(chain, lens, t)
        plans.append(best)
    return sorted(plans, key=lambda p: p.predicted_s_per_token)


def goodput(plan: Plan, batch: int) -> float:
    """Committed tokens per second for a whole batch running `plan` (every sequence gets a token per L_N)."""
    return batch / plan.predicted_s_per_token
