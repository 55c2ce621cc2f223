"""Acceptance between every (drafter, verifier) pair, estimated from distribution divergence.

alpha = E[sum_x min(q_draft(x), p_target(x))] = 1 - E[TV(q_draft, p_target)]: the probability that
a drafted token is accepted. Every verification pass already has both rows, so each pass updates an
EMA per prompt class (and a pooled one across classes). Unseen pairs start from a prior.

Acceptance is not independent from one position to the next: easy stretches (boilerplate, a quoted
passage) accept long runs, hard ones reject at once, so long blocks pay more than the i.i.d. formula
(1 - a^(g+1)) / (1 - a) says. So the table also keeps, per pair and class, how often a block that
reached position j had it accepted (decayed counts, seeded at calibration), and expected tokens per
round come from these position-by-position acceptance rates, each shrunk toward the other
classes' rate at that position and toward alpha (expected_tokens). A block that holds fewer tokens
than asked (an n-gram without a match, a drafter that stopped unsure) counts its first missing
position as a rejection: the verifier emits its own token there either way.

A drafter that stops unsure also costs less than its block length: the table keeps, per drafter and
class, how often a block asked for more than j tokens drafted its (j+1)-th, so the latency model
charges the tokens a block of n is expected to draft. It stops the same way anywhere in a chain (in
the middle it ends the blocks it passes up after a token it was unsure of: specrouter/core/chain.py), so
these counts hold for it at every level, and its position rates have their own prior (`stops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

POOLED = "*"


def rejection_ratio(alpha: float, reference: float) -> float:
    """How much more often than at acceptance `reference` tokens are rejected at acceptance `alpha`.
    Rates are scaled by it as 1 - (1 - rate) * ratio, not as rate * alpha / reference: where a drafter
    is all but sure (the deep positions of one that stops unsure) a harder prompt still rarely
    rejects, and with acceptance independent of position (rate = reference) both give alpha."""
    return (1.0 - alpha) / max(1.0 - reference, 1e-3)


def _rejecting(rate: float, ratio: float) -> float:
    return min(1.0, max(0.0, 1.0 - (1.0 - rate) * ratio))


def _odds_scaled(rate: float, ratio: float) -> float:
    """`rate` with its odds of rejection scaled by `ratio`: like `_rejecting` where rejections are rare,
    but a position where the drafter mostly stops (rate 0.09) is not all but closed by a ratio of 1.05."""
    return rate / (rate + (1.0 - rate) * ratio) if rate > 0 else 0.0


def _rounds_ratio(runs: "_Runs", rates: list[float], prior: float = 1.0) -> float:
    """How much more often than `rates` (acceptance by position) predict the rounds `runs` were
    rejected, at the positions they reached: observed over expected rejections, each with `prior`
    rejections added, so that a request's first rounds move it only part of the way."""
    observed = sum(r - a for r, a in zip(runs.reached, runs.accepted))
    expected = sum(r * (1.0 - h) for r, h in zip(runs.reached, rates))
    return (observed + prior) / (expected + prior)


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

    def add_round(self, num_draft: int, num_accepted: int, num_asked: int | None, decay: float, weight: float = 1.0) -> None:
        """A verification round: num_accepted of num_draft drafted tokens, of a block asked for num_asked
        (None: num_draft). A block that holds fewer than asked reached its first missing position and
        had it rejected: the verifier emits its own token there either way."""
        self.add(max(num_draft, num_asked or 0), num_accepted, decay, weight)

    def excluding(self, part: "_Runs | None") -> "_Runs":
        """These counts less a part of them (one class's, of the pooled counts); about the others'
        counts, as the pooled counts decay on the other classes' rounds too."""
        if part is None:
            return self
        return _Runs([max(0.0, a - b) for a, b in zip(self.reached, part.reached)],
                     [max(0.0, a - b) for a, b in zip(self.accepted, part.accepted)])


@dataclass
class AcceptanceTable:
    ema: float = 0.05  # weight of one position's observation
    pooled_ema: float = 0.01  # the same over all classes: a long-run mean, not the last request's class
    prior: float = 0.5
    prior_weight: float = 2.0  # observations' worth of trust in the fallback
    _alpha: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (class, drafter, verifier)
    _count: dict[tuple[str, str, str], int] = field(default_factory=dict)
    run_decay: float = 0.99  # per round: the position rates follow about the last 100 rounds
    run_prior_weight: float = 10.0  # rounds' worth of trust in alpha at a position
    # ... for a drafter that stops unsure: it reaches deep positions only while sure, so alpha is the wrong
    # shape there and its rounds must soon outweigh it
    stopping_run_prior_weight: float = 3.0
    _runs: dict[tuple[str, str, str], _Runs] = field(default_factory=dict)  # (class, drafter, verifier)
    draft_prior_weight: float = 3.0  # blocks' worth of trust that a drafter drafts every token asked
    _drafts: dict[tuple[str, str], _Runs] = field(default_factory=dict)  # (class, drafter): position j reached / drafted

    def observe(self, klass: str, drafter: str, verifier: str, alphas: list[float]) -> None:
        for key, ema in (((klass, drafter, verifier), self.ema), ((POOLED, drafter, verifier), self.pooled_ema)):
            value, n = self._alpha.get(key, 0.0), self._count.get(key, 0)
            for a in alphas:
                n += 1
                # the running mean until 1/ema observations, then the EMA: an early outlier (a greedy
                # first position is 0 or 1) must not anchor the estimate for hundreds of positions
                value += max(ema, 1.0 / n) * (a - value)
            if n:
                self._alpha[key], self._count[key] = value, n

    def observe_round(self, klass: str, drafter: str, verifier: str, num_draft: int, num_accepted: int, num_asked: int | None = None,
                      weight: float = 1.0) -> None:
        """One verification round's outcome: num_accepted of num_draft drafted tokens accepted, of a
        block asked for num_asked (default num_draft); `weight`: the rounds it counts for (a
        calibration's blocks count for less than rounds really run)."""
        for key in ((klass, drafter, verifier), (POOLED, drafter, verifier)):
            self._runs.setdefault(key, _Runs()).add_round(num_draft, num_accepted, num_asked, self.run_decay, weight)

    def observe_draft(self, klass: str, drafter: str, num_asked: int, num_drafted: int) -> None:
        """A drafter asked for num_asked tokens drafted num_drafted of them (at the bottom of a chain, or,
        one that stops unsure, passing its block up from the middle: AdaptiveRouter.middle_blocks)."""
        keys = {(klass, drafter), (POOLED, drafter)}
        for key in keys:
            self._drafts.setdefault(key, _Runs()).add(num_asked, min(num_drafted, num_asked), self.run_decay)

    def expected_drafted(self, klass: str, drafter: str, n: int, request: _Runs | None = None) -> float:
        return self.expected_drafted_by_length(klass, drafter, n, request)[n]

    def expected_drafted_by_length(self, klass: str, drafter: str, n: int, request: _Runs | None = None) -> list[float]:
        """[n + 1]: tokens a block asked for 0..n is expected to draft: for n, sum_i prod_{j <= i} c_j,
        with c_j the rate at which a block that drafted j tokens (and was asked for more) drafted another.

        While the class has seen few blocks reach position j, c_j is shrunk toward the other classes'
        rate there, and where they have seen few too, toward c_(j-1) (c_0 and c_1 toward 1: a drafter
        drafts what it is asked for until seen stopping). So a class seen little starts from what the
        drafter does elsewhere, and a position beyond the blocks seen so far stops as often as the
        last one seen, not never: a drafter seen only on short blocks is not charged for long ones it
        would cut short (optimism that running the longer block then corrects). Given a `request`'s
        own blocks (OwnAcceptance.drafts), its rate at each position is shrunk toward the class's
        (or, if lower, its own rate before): a drafter that stops unsure stops sooner on a prompt it
        finds hard, also beyond the positions the request's blocks have reached. Whether a block
        holds a first token at all is no prior for the positions after it: a model drafts its first
        token always, and an n-gram drafts one only where it finds a match (c_0 is how often), which
        it then follows for as long as the match goes on."""
        pooled, own = self._drafts.get((POOLED, drafter)), self._drafts.get((klass, drafter)) if klass != POOLED else None
        if pooled is None:
            return [float(i) for i in range(n + 1)]
        others = pooled.excluding(own)
        expected, survive, rate, here = [0.0], 1.0, 1.0, 1.0
        for j in range(n):
            if j < MAX_POSITIONS:
                if j == 1:  # whether a block holds a first token is no prior for the positions after it
                    rate = here = 1.0
                rate = self._shrink(others, j, rate, self.draft_prior_weight)
                if own is not None:
                    rate = self._shrink(own, j, rate, self.draft_prior_weight)
                # the request's own: toward the class's rate, or where it stopped more often, its own last rate
                here = self._shrink(request, j, min(rate, here), self.draft_prior_weight) if request is not None else rate
            survive *= here
            expected.append(expected[-1] + survive)
        return expected

    def expected_tokens(self, klass: str, drafter: str, verifier: str, g: int, ratio: float = 1.0, stops: bool = False,
                        request: _Runs | None = None) -> float:
        return self.expected_tokens_by_length(klass, drafter, verifier, g, ratio, stops, request)[g]

    def expected_tokens_by_length(self, klass: str, drafter: str, verifier: str, g: int, ratio: float = 1.0, stops: bool = False,
                                  request: _Runs | None = None) -> list[float]:
        """[g + 1]: tokens a verifier emits per round for a block of 0..g: for g, 1 + sum_i prod_{j <= i}
        h_j, with h_j the class's acceptance rate at position j, its rejections scaled by `ratio` (a
        sequence's own rejection_ratio to its class's), then shrunk toward the rate of the `request`'s own rounds
        of the pair there (OwnAcceptance.runs), where it has run some: a prompt the drafter finds
        hard rejects early and stops early in its blocks, which a ratio of agreement at the positions
        drafted does not see.

        While the class has seen few rounds reach position j, h_j is shrunk toward the other classes'
        rate there (their rejections scaled by the class's rejection_ratio to the pooled alpha: the
        shape of the pair's runs elsewhere at the class's own level of acceptance), and where they have
        seen few too, toward the class's alpha. For a drafter that `stops` unsure, toward alpha or
        h_(j-1), whichever is higher: it reaches a deep position only while it is sure, so a position
        with few rounds seen is accepted at least as often as the one before it.

        Where the request's rounds are few (the deep positions of a drafter that stops unsure are
        reached by few of them), each h_j it is shrunk toward has its odds of rejection scaled first by
        the request's own rejections over those the class's rates predict at the positions its rounds
        reached (`_rounds_ratio`): its few deep rounds are read at its own level of difficulty, not
        its class's."""
        alpha = self.alpha(klass, drafter, verifier)
        pooled = self._runs.get((POOLED, drafter, verifier))
        own = self._runs.get((klass, drafter, verifier)) if klass != POOLED else None
        others = pooled.excluding(own) if pooled is not None else None
        relative = rejection_ratio(alpha, self.alpha(POOLED, drafter, verifier))
        weight = self.stopping_run_prior_weight if stops else self.run_prior_weight
        rates, rate = [], alpha  # [max(g, MAX_POSITIONS) with a request]: the class's rate at each position
        for j in range(max(g, MAX_POSITIONS) if request is not None else g):
            rate = max(alpha, rate) if stops else alpha
            if others is not None and j < MAX_POSITIONS and others.reached[j] > 0:
                elsewhere = _rejecting(others.accepted[j] / others.reached[j], relative)
                rate = (others.reached[j] * elsewhere + weight * rate) / (others.reached[j] + weight)
            if own is not None and j < MAX_POSITIONS:
                rate = self._shrink(own, j, rate, weight)
            rates.append(_rejecting(rate, ratio))
        if request is not None:
            harder = _rounds_ratio(request, rates)
            rates = [self._shrink(request, j, _odds_scaled(h, harder), weight) if j < MAX_POSITIONS else _odds_scaled(h, harder)
                     for j, h in enumerate(rates)]
        expected, survive = [1.0], 1.0
        for here in rates[:g]:
            survive *= here
            expected.append(expected[-1] + survive)
        return expected

    @staticmethod
    def _shrink(runs: _Runs, j: int, prior: float, weight: float) -> float:
        """The rate of acceptance (continuation) at position j, with `weight` rounds of `prior` added."""
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
    drafts: dict[str, _Runs] = field(default_factory=dict)  # drafter -> its blocks: position j reached / drafted
    runs: dict[tuple[str, str], _Runs] = field(default_factory=dict)  # (drafter, verifier) -> its rounds: position j reached / accepted

    def observe(self, drafter: str, verifier: str, alphas: list[float]) -> None:
        if not alphas:  # an empty block (an n-gram without a match) says nothing of acceptance
            return
        total, n = self._sums.get((drafter, verifier), (0.0, 0))
        self._sums[(drafter, verifier)] = (total + sum(alphas), n + len(alphas))

    def observe_round(self, drafter: str, verifier: str, num_draft: int, num_accepted: int, num_asked: int | None = None) -> None:
        """One verification round, as AcceptanceTable.observe_round counts it (undecayed)."""
        self.runs.setdefault((drafter, verifier), _Runs()).add_round(num_draft, num_accepted, num_asked, decay=1.0)

    def observe_draft(self, drafter: str, num_asked: int, num_drafted: int) -> None:
        """A drafter asked for num_asked tokens drafted num_drafted of them (at the bottom of a chain, or,
        one that stops unsure, passing its block up from the middle: AdaptiveRouter.middle_blocks)."""
        self.drafts.setdefault(drafter, _Runs()).add(num_asked, min(num_drafted, num_asked), decay=1.0)

    def alpha(self, drafter: str, verifier: str, fallback: float, weight: float = 20.0) -> float | None:
        """The request's acceptance of a pair, shrunk toward `fallback` (its class's) while it has few
        observations (`weight`: about the class EMA's memory, so one block rejected early does not
        swing it); None before any."""
        total, n = self._sums.get((drafter, verifier), (0.0, 0))
        return (total + weight * fallback) / (n + weight) if n else None

    def ratios(self, table: AcceptanceTable, klass: str) -> dict[tuple[str, str], float]:
        """(drafter, verifier) -> the request's rejection_ratio to its class in `table`, for every
        pair it has run."""
        out = {}
        for pair in self._sums:
            fallback = table.alpha(klass, *pair)
            out[pair] = rejection_ratio(self.alpha(*pair, fallback), fallback)
        return out
