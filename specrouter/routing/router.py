"""Adaptive routing: pick the chain and draft lengths with the lowest predicted time per token for
the requests stepping together, from costs and acceptances learned online, and re-plan as they move.

The router is shared by all requests (it owns the profiler and the acceptance table per class). The
generation loop (specrouter/engine/loop.py) keeps a `RequestRoute` per request and, before every step,
asks `plan` for the batch's plan; after it, `observe` gets each request's records and the step's level
timings. A batch of one is planned for its request alone: its own acceptance of each pair, so an easy
prompt of a class is planned for what it accepts, not for its class's average; re-planning every
`replan_every` steps with hysteresis (a new request's first plan against the one its class's last
request planned), and at once after a level's cost changed as a whole. A larger batch is planned for
its classes' acceptance at its batch size's costs (goodput), speculating only when that is clearly
faster than plain batched decoding, and each sequence drafts at the top what its own acceptance pays
for. Every `explore_every` steps the least recently measured drafter (else pair of neighbours) is
re-measured, so estimates of levels out of use (a drafter that slowed down and recovered) stay fresh:
its best plan runs once if it is predicted close to the best and that step costs little (its drafters'
catch-up on what they missed, and its longer blocks, at most EXPLORE_BUDGET of the time until the next
look; less and less often while such steps leave it out of use), else (a request alone) one small
timed pass of the level (a probe) refreshes its cost without running a slow chain (less and less often
while probes find that cost unchanged); a level on the device of a level in use (a skip-layer view of
the target's weights) needs no probe, as its costs follow that level's. A drafter whose catch-up has
grown too dear to explore returns when its plan, catch-up included, is predicted best. An n-gram
drafter's cost and its acceptance need neither: the loop replays it against the target on every step
of a routed request (specrouter/core/shadow.py), and those replays stand for its acceptance by every
verifier. Calibration at start (specrouter/engine/calibration.py) measures every level's cost, then
every pair's acceptance on the target's own continuation of a prompt per class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from specrouter.core.chain import CATCH_UP
from specrouter.core.records import TimingRecord, VerifyRecord
from specrouter.core.levels import Level, ProposeItem, ScoreItem
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState
from specrouter.core.spec import LevelSpec
from specrouter.routing.acceptance import POOLED, AcceptanceTable, OwnAcceptance, rejection_ratio
from specrouter.routing.config import RouterConfig
from specrouter.routing.profiler import LEVEL_CHANGE, ForwardProfiler
from specrouter.routing.scheduler import CostFn, DraftFn, Plan, predict, search
from specrouter.routing.tiering import TieringChoice


EXPLORE_WEIGHT = 0.8  # an exploratory measurement is fresh news about a level out of use
PROBE_BACKOFF = 4  # a level whose probes keep confirming its cost is probed at most this many times less often
EXPLORE_BACKOFF = 2  # a level or pair whose explorations keep it out of use is explored at most this many times less often
# An exploration costs its drafters' catch-up and a step on a plan predicted slower, lost unless its plan is
# then adopted: it runs only where that is at most this share of the time until the item's next one
EXPLORE_BUDGET = 0.1


@dataclass
class RequestRoute:
    """One request's routing state, kept by the generation loop: its class, its own acceptance of the
    pairs and blocks of the drafters it ran, and the plan it runs alone and for how long."""

    klass: str = "default"
    own: OwnAcceptance = field(default_factory=OwnAcceptance)
    plan: Plan | None = None  # its plan while it steps alone (None: none yet, or it stepped in a batch)
    steps_since_plan: int = 0
    level_changes: int = 0  # the profiler's level-wide changes when it was planned (ForwardProfiler.changes)
    steps: int = 0  # steps observed: the first also prefills every level (`taught`)


@dataclass(frozen=True)
class Decision:
    """A step's plan for the requests stepping together: the chain and draft lengths, each sequence's
    draft length at the top (the plan's for a request alone), why, and the best plan on another chain."""

    plan: Plan
    top_lens: tuple[int, ...]
    reason: str
    runner_up: Plan | None = None


class AdaptiveRouter:
    def __init__(self, pool: list[str], target: str, can_verify: dict[str, bool], config: RouterConfig = RouterConfig(),
                 levels: dict[str, Level] | None = None, stopping: frozenset[str] = frozenset(),
                 hosts: dict[str, str] | None = None, max_top_len: int | None = None, lookup: frozenset[str] = frozenset(),
                 siblings: frozenset[tuple[str, str]] = frozenset()):
        """`levels`: the pool's levels by name (by reference: a replaced level is seen), to probe a stale
        level's cost directly.
        `stopping`: drafters that end their blocks unsure (at every level of a chain: specrouter/core/chain.py).
        `lookup`: prompt-lookup drafters (n-gram), which draft only where the text repeats itself.
        `hosts`: level -> the level whose device it runs on (a skip-layer view of its weights: `shared_devices`).
        `max_top_len`: the longest block the target verifies (its `max_block`; None: any).
        `siblings`: (lower, upper) pairs never run as neighbours in a chain (`sibling_pairs`)."""
        self.pool, self.target = list(pool), target  # pool: drafters, cheapest first
        self.max_top_len = max_top_len
        self.can_verify = can_verify
        self.stopping = stopping
        self.lookup = lookup
        self.config = config
        self.profiler = ForwardProfiler()
        self.acceptance = AcceptanceTable()
        self.tiering = TieringChoice(config.hysteresis, config.explore_every)  # requests in tiered (lossy) mode: tier or not
        self.overhead_s = 0.0  # per-round time outside level calls (EMA)
        self._step = 0
        names = self.pool + [target]
        self.siblings = siblings
        self._pairs = [(d, v) for i, d in enumerate(self.pool) for v in names[i + 1:] if can_verify.get(v, True) and self._stacks(d, v)]
        self._last_measured: dict[str | tuple[str, str], int] = {item: 0 for item in names + self._pairs}  # level or pair -> step
        self._exploring: set[str] = set()  # levels whose next measurement replaces most of the old one
        self._explored = False  # whether the step planned last explores (its levels and pairs are not in use)
        # steps between probes of a level out of use: doubled (up to PROBE_BACKOFF x explore_every) each time a
        # probe finds its cost as predicted, since each costs a pass of that level (for a large level, a share of
        # the workload's time worth saving); back to explore_every once a probe finds it changed or a chain runs it.
        # Likewise between explorations of a level or pair (up to EXPLORE_BACKOFF x explore_every): doubled by each
        # (a step on a plan predicted slower, and a drafter's catch-up on what it missed), back to explore_every once
        # a plan chosen on its merits runs it.
        self._probe_every: dict[str | tuple[str, str], int] = {}
        self._levels: dict[str, Level] = levels if levels is not None else {}
        # per class, the plan its last request planned: a new request starts from it with the same hysteresis
        # (two chains a few % apart in the model are near ties: one request's estimates must not flip them)
        self._incumbent: dict[str, Plan] = {}
        self._replayed: set[str] = set()  # drafters replayed against the target on every step (_estimated_as)
        # a level on another's device is measured whenever that one runs: its costs follow the other's
        # level-wide changes (ForwardProfiler.share), so it is never probed while the other runs (a probe
        # of a skip-layer view is a pass of the target's size, spent on news the target's own passes bring)
        self._guests: dict[str, list[str]] = {}
        for level, host in (hosts or {}).items():
            self.profiler.share(level, host)
            self._guests.setdefault(host, []).append(level)

    def _stacks(self, lower: str, upper: str) -> bool:
        return (lower, upper) not in self.siblings

    def lengths_of(self, drafter: str) -> tuple[int, ...]:
        """The block lengths searched for a drafter (prompt lookup has longer ones)."""
        return self.config.lookup_lengths if drafter in self.lookup else self.config.lengths

    def longest_block(self) -> int:
        """The most drafted tokens a plan may put in one block."""
        return max((max(self.lengths_of(d)) for d in self.pool), default=0)

    # -- the latency model's inputs ---------------------------------------------------------------------

    def _verify_cost(self, level: str, num_tokens: int, batch: int = 1) -> float:
        t = self.profiler.score_time(level, num_tokens, batch)
        return t if t is not None else self.config.default_cost_s

    def _draft_cost(self, level: str, num_tokens: float = 1.0, batch: int = 1) -> float:
        """Seconds for one call of `level` drafting `num_tokens` for each of `batch` sequences."""
        t = self.profiler.draft_time(level, num_tokens, batch)
        if t is not None:
            return t
        single = self.profiler.score_time(level, 1, batch)  # a model drafts one token per single-token pass
        return num_tokens * (single if single is not None else self.config.default_cost_s)

    def _costs(self, batch: int) -> tuple[CostFn, DraftFn]:
        """The latency model's costs at this batch size: a verification pass, a drafting call."""
        return (lambda level, n: self._verify_cost(level, n, batch)), (lambda level, n: self._draft_cost(level, n, batch))

    def plans(self, klass: str, own: OwnAcceptance | None = None) -> list[Plan]:
        """Every chain's best plan for a request of `klass` alone, best first; `own`: the request's own
        acceptance and blocks, where it has run some."""
        return self._search([klass], own)

    def _search(self, classes: list[str], own: OwnAcceptance | None = None) -> list[Plan]:
        """Every chain's best plan for requests of these classes stepping together (acceptance averaged
        over them; `own`: a request alone's own), from the costs profiled at their batch size, best first."""
        verify, draft = self._costs(len(classes))
        return search(
            self.pool,
            self.target,
            verify=verify,
            draft=draft,
            alpha=self._alpha(classes),
            overhead=self.overhead_s,
            can_verify=lambda name: self.can_verify.get(name, True),
            lengths=self.config.lengths,
            own_lengths={d: self.lengths_of(d) for d in self.lookup},
            max_drafters=self.config.max_drafters,
            stacks=self._stacks,
            max_top_len=self.max_top_len,
            expected=self._expected(classes, self._own_ratios(classes[0], own), own),
            drafted=self._drafted(classes, own),
            # drafters that stop unsure propose up to the longest length, unsearched: their block length is a cap
            # that binds only while they stay sure, and the model's rates at deep positions rest on few rounds
            fixed={d: max(self.config.lengths) for d in self.stopping},
        )

    def _own_ratios(self, klass: str, own: OwnAcceptance | None) -> dict[tuple[str, str], float] | None:
        """A request's rejection ratio to its class for each pair it has run (OwnAcceptance.ratios).
        A drafter it has run only against the target carries that ratio to its other verifiers: how
        well a text suits a drafter hardly depends on which level checks it (a replayed one is
        estimated from its replays for every verifier anyway: _estimated_as)."""
        if own is None:
            return None
        ratios = own.ratios(self.acceptance, klass)
        for drafter, verifier in self._pairs:
            if (drafter, verifier) not in ratios and (drafter, self.target) in ratios:
                ratios[(drafter, verifier)] = ratios[(drafter, self.target)]
        return ratios

    def _expected(self, classes: list[str], ratios: dict[tuple[str, str], float] | None = None, own: OwnAcceptance | None = None):
        """(drafter, verifier, g) -> tokens per round, averaged over the classes; `ratios` scales some
        pairs' rejections (a sequence's own against its class: OwnAcceptance.ratios); `own`: a
        request's rounds of the pairs it ran.

        A drafter that does not stop ends a round where it disagrees: its ratio says it all, and
        following its rounds as well would only add their noise. The rates of a drafter that stops
        unsure follow the request's rounds instead, position by position, and not its ratio: its
        rounds end at its stops too, which the ratio does not see, and its agreement is measured
        only where it was sure, which the class's may not be (calibration's is over every position
        of a text: a high agreement on the tokens it was sure of, against a class alpha over every
        position, is a small ratio, most of the class's rejections taken away at every position). So
        do a prompt-lookup drafter's: its rounds end where it finds nothing to draft, and its
        agreement is measured only where it found a match (a request whose matches are accepted whole
        would otherwise have its class's no-match rounds scaled away too)."""
        by_length: dict[tuple[str, str], list[float]] = {}  # (drafter, verifier) -> [E(0), ..., E(longest)]

        def expected(d: str, v: str, g: int) -> float:
            if len(by_length.get((d, v), ())) <= g:
                stops, pair = d in self.stopping or d in self.lookup, self._estimated_as(d, v)
                ratio = 1.0 if stops else (ratios or {}).get(pair, 1.0)
                request = own.runs.get(pair) if own and stops else None
                n = max(g, *self.lengths_of(d))
                per_class = [self.acceptance.expected_tokens_by_length(k, *pair, n, ratio, stops, request) for k in classes]
                by_length[(d, v)] = [sum(e) / len(classes) for e in zip(*per_class)]
            return by_length[(d, v)][g]
        return expected

    def _alpha(self, classes: list[str]):
        """(drafter, verifier) -> acceptance, averaged over the classes."""
        return lambda d, v: sum(self.acceptance.alpha(k, *self._estimated_as(d, v)) for k in classes) / len(classes)

    def _estimated_as(self, drafter: str, verifier: str) -> tuple[str, str]:
        """The pair whose estimates stand for (drafter, verifier). A drafter replayed against the
        target on every step (prompt lookup: specrouter/core/shadow.py) is estimated from those replays
        for every verifier: how well a text suits it hardly depends on which level checks it, and its
        pairs with other verifiers are measured only while a chain runs them. Estimated apart, a class
        whose early requests ran without it would keep the acceptance calibration gave it below a
        middle level (on a text that did not copy), however much its replays against the target had
        learned since, and never run the chain with it below that level."""
        return (drafter, self.target) if drafter in self._replayed else (drafter, verifier)

    def _drafted(self, classes: list[str], own: OwnAcceptance | None = None):
        """(drafter, n) -> tokens a block asked for n holds, averaged over the classes (and following a
        request's `own` blocks where it has run some); fewer than n for one that stops unsure."""
        by_length: dict[str, list[float]] = {}  # drafter -> [D(0), ..., D(longest)]

        def drafted(level: str, n: int) -> float:
            if len(by_length.get(level, ())) <= n:
                request = own.drafts.get(level) if own else None
                longest = max(n, *self.lengths_of(level))
                per_class = [self.acceptance.expected_drafted_by_length(k, level, longest, request) for k in classes]
                by_length[level] = [sum(d) / len(classes) for d in zip(*per_class)]
            return by_length[level][n]
        return drafted

    # -- planning ---------------------------------------------------------------------------------------

    def plan(self, requests: list[RequestRoute], backlog: dict[str, int] | None = None,
             remaining: float = float("inf")) -> Decision:
        """The next step's plan for the requests stepping together (a request alone is a batch of one).

        `backlog[level]`: context tokens (summed over the requests) a drafter has not cached, which it
        must prefill before it can draft: a drafter left idle (out of the chain, or while the batch was
        large) has fallen behind. That one-off cost is spread over the `remaining` tokens each request
        still has to generate, so a far-behind drafter returns only when it will pay for its catch-up.

        A request alone is planned for its own acceptance (`RequestRoute.own`), keeps its plan for
        `replan_every` steps (unless a level's cost changed as a whole since), and switches only to a
        plan predicted faster by the `hysteresis` margin than the one it runs (a new request: the one
        its class's last request planned). Two or more are planned for their classes at their batch
        size's costs, plain batched decoding unless speculation is predicted `batch_speculation_margin`
        faster, each sequence then drafting at the top what its own acceptance pays for
        (`sequence_draft_lens`). Both explore a level or pair not measured for `explore_every` steps
        when its best plan is within `explore_margin` of the best and the step costs little
        (`_worth_exploring`); a request alone probes a level that is not, where it can."""
        self._explored = False
        if len(requests) == 1:
            plan, ranked, reason = self._plan_alone(requests[0], backlog, remaining)
            top_lens = (plan.draft_lens[-1] if plan.draft_lens else 0,)
        else:
            plan, ranked, reason = self._plan_batch(requests, backlog, remaining)
            top_lens = tuple(self.sequence_draft_lens(plan, requests))
        return Decision(plan, top_lens, reason, next((p for p in ranked if p.chain != plan.chain), None))

    def _plan_alone(self, request: RequestRoute, backlog: dict[str, int] | None, remaining: float) -> tuple[Plan, list[Plan], str]:
        """A request alone: the plan, the ranked candidates, and why."""
        klass, own = request.klass, request.own
        stale = self._stalest()
        if stale is not None:
            ranked = self._ranked([klass], backlog, remaining, own)
            explore = next((p for p in ranked if _runs(p.chain, stale)), None)
            promising = self._worth_exploring(stale, explore, ranked[0], [klass], backlog, own)
            self._last_measured[stale] = self._step
            if not promising and stale in self._levels:
                # Far behind: re-measure its cost with one small pass instead of running a slow chain.
                self._probe(stale)
            elif promising or (explore is not None and isinstance(stale, str)):  # a level we cannot probe: run it
                explore = self._exploration(explore, backlog)
                if isinstance(stale, str):
                    self._exploring.add(stale)
                what = stale if isinstance(stale, str) else " -> ".join(stale)
                return explore, ranked, f"explore: {what} not measured for {self.config.explore_every}+ steps"
        if (request.plan is not None and request.steps_since_plan < self.config.replan_every
                and request.level_changes == self.profiler.changes):  # a level slowed or recovered since: re-plan now
            request.steps_since_plan += 1
            # the same plan, its prediction brought up to date with the request's latest rounds (what the
            # response's explanation compares with the time measured: a short request has few steps)
            request.plan = self._predicted(request.plan, [klass], own)
            return request.plan, [], "keep"
        ranked = self._ranked([klass], backlog, remaining, own)
        best = ranked[0]
        reason = "best predicted"
        previous = request.plan if request.plan is not None else self._incumbent.get(klass)
        if previous is not None and best.chain + best.draft_lens != previous.chain + previous.draft_lens:
            current = self._predicted(previous, [klass], own)
            if backlog:
                current = self._with_catch_up(current, backlog, remaining)
            if best.predicted_s_per_token > current.predicted_s_per_token * (1 - self.config.hysteresis):
                best, reason = current, "hysteresis: best is not enough faster"
        request.plan, request.steps_since_plan, request.level_changes = best, 1, self.profiler.changes
        self._incumbent[klass] = best
        return best, ranked, reason

    def _plan_batch(self, requests: list[RequestRoute], backlog: dict[str, int] | None, remaining: float) -> tuple[Plan, list[Plan], str]:
        """Two or more requests: the plan with the best goodput for the batch, the ranked candidates, and why."""
        for request in requests:
            request.plan = None  # alone again, a request plans afresh (from its class's last plan)
        ranked = self._ranked([r.klass for r in requests], backlog, remaining)
        reason = "best goodput for the batch"
        plain = next(p for p in ranked if len(p.chain) == 1)
        if ranked[0] is not plain and ranked[0].predicted_s_per_token > plain.predicted_s_per_token * (1 - self.config.batch_speculation_margin):
            ranked = [plain] + [p for p in ranked if p is not plain]  # too close to call: the safe plan
            reason = "plain decoding: speculation is not enough faster for the batch"
        stale = self._stalest()
        if stale is not None:
            self._last_measured[stale] = self._step
            explore = next((p for p in ranked if _runs(p.chain, stale)), None)
            if self._worth_exploring(stale, explore, ranked[0], [r.klass for r in requests], backlog):
                what = stale if isinstance(stale, str) else " -> ".join(stale)
                return self._exploration(explore, backlog), ranked, f"explore: {what} not measured for {self.config.explore_every}+ steps"
        return ranked[0], ranked, reason

    def _ranked(self, classes: list[str], backlog: dict[str, int] | None, remaining: float,
                own: OwnAcceptance | None = None) -> list[Plan]:
        """The plans, best first, each charged its drafters' catch-up prefill (see `plan`)."""
        plans = self._search(classes, own)
        if not backlog:
            return plans
        return sorted((self._with_catch_up(p, backlog, remaining) for p in plans), key=lambda p: p.predicted_s_per_token)

    def _with_catch_up(self, plan: Plan, backlog: dict[str, int], remaining: float) -> Plan:
        return Plan(plan.chain, plan.draft_lens, plan.predicted_s_per_token + self._catch_up_s(plan, backlog) / max(remaining, 1.0))

    def _catch_up_s(self, plan: Plan, backlog: dict[str, int] | None) -> float:
        """Predicted seconds the plan's drafters take to cache the context they have not (`backlog`)."""
        return sum(self.profiler.prefill_time(level, backlog[level]) or 0.0 for level in plan.chain[:-1] if backlog and backlog.get(level))

    def _worth_exploring(self, item: str | tuple[str, str], explore: Plan | None, best: Plan, classes: list[str],
                         backlog: dict[str, int] | None, own: OwnAcceptance | None = None) -> bool:
        """Whether a stale level's or pair's best plan (`explore`, its catch-up spread over the remaining
        tokens) is worth a step: predicted at most `explore_margin` slower than the best, and the step it
        explores with (`_exploration`: its catch-up, and a block on a plan predicted slower) at most
        EXPLORE_BUDGET of the time until the item's next exploration (at one token a step on the best)."""
        if explore is None or explore.predicted_s_per_token > best.predicted_s_per_token * self.config.explore_margin:
            return False
        run = self._predicted(_lengthened(explore), classes, own)
        cost = self._catch_up_s(run, backlog) + max(0.0, run.predicted_s_per_token - best.predicted_s_per_token) * (run.draft_lens[-1] + 1)
        return cost <= EXPLORE_BUDGET * self._probe_every.get(item, self.config.explore_every) * best.predicted_s_per_token

    def _predicted(self, plan: Plan, classes: list[str], own: OwnAcceptance | None = None) -> Plan:
        """The plan with its prediction for requests of these classes stepping together, as `_search` makes it."""
        t = predict(plan.chain, plan.draft_lens, *self._costs(len(classes)), self._alpha(classes), self.overhead_s,
                    self._expected(classes, self._own_ratios(classes[0], own), own), self._drafted(classes, own))
        return Plan(plan.chain, plan.draft_lens, t)

    def _exploration(self, plan: Plan, backlog: dict[str, int] | None) -> Plan:
        """The plan run to explore: long enough blocks that one step measures acceptance, not just cost.
        It measures every level and pair it runs, so none of them is explored again at once. One that
        brings back a drafter out of use (which first catches up on what it missed) is dearer: its
        levels and pairs then wait twice as long as before for their next one, unless a plan chosen on
        its merits runs them meanwhile."""
        every, longest = self.config.explore_every, EXPLORE_BACKOFF * self.config.explore_every
        idle = any(backlog.get(level, 0) > CATCH_UP for level in plan.chain[:-1]) if backlog else False
        for item in (*plan.chain, *zip(plan.chain, plan.chain[1:])):
            self._last_measured[item] = self._step
            if idle and item != self.target:
                self._probe_every[item] = min(2 * self._probe_every.get(item, every), longest)
        self._explored = True
        return _lengthened(plan)

    def _stalest(self) -> str | tuple[str, str] | None:
        """The drafter, else the (drafter, verifier) pair, measured longest ago, if explore_every or more
        steps ago. A pair's acceptance goes stale too: one that had bad luck while its chain ran is not
        measured again while another chain runs, so without a look now and then it would never return."""
        if self.config.explore_every <= 0:
            return None
        for items in (self.pool, self._pairs):
            due = [i for i in items if self._step - self._last_measured[i] >= self._probe_every.get(i, self.config.explore_every)]
            if due:
                return min(due, key=lambda i: self._last_measured[i])
        return None

    def sequence_draft_lens(self, plan: Plan, requests: list[RequestRoute]) -> list[int]:
        """Each sequence's draft length at the top of `plan`: the length (at most the plan's) that its
        own acceptance of the top pair pays for at this batch size (its class's until it has run the
        pair). For a drafter that stops unsure, whose agreement ratio `_expected` leaves out, its own
        rounds and blocks where it has run some, else its class's. The batch's pass is ragged
        (specrouter/core/model.py forward_batch), so a shorter block costs less."""
        if len(plan.chain) < 2:
            return [0] * len(requests)
        classes = [r.klass for r in requests]
        top = (plan.chain[-2], plan.chain[-1])
        verify, draft = self._costs(len(requests))
        class_alpha = self._alpha(classes)
        lens = []
        for request in requests:
            alpha = request.own.alpha(*top, fallback=self.acceptance.alpha(request.klass, *top))
            ratio = rejection_ratio(alpha, class_alpha(*top)) if alpha is not None else 1.0
            expected, drafted = self._expected(classes, {top: ratio}, request.own), self._drafted(classes, request.own)
            candidates = [g for g in self.lengths_of(top[0]) if g <= plan.draft_lens[-1]] or [plan.draft_lens[-1]]
            lens.append(min(candidates, key=lambda g: predict(plan.chain, plan.draft_lens[:-1] + (g,), verify, draft,
                                                              class_alpha, self.overhead_s, expected, drafted)))
        return lens

    # -- feedback ---------------------------------------------------------------------------------------

    def observe(self, requests: list[RequestRoute], records: list[list], timings: list[TimingRecord] = (),
                seconds: float | None = None) -> None:
        """One step's feedback: each request's records (its verdicts, and the shadow replays' rounds) and
        the step's level timings (`timings`, one per batched level call), and `seconds` it took in all.
        Each request's first step (it also prefills every level) teaches no acceptance (`taught`).
        A request alone also times the step's overhead outside level calls, per verification round."""
        self._step += 1
        level_seconds, rounds = 0.0, 0
        alone = len(requests) == 1
        for request, request_records in zip(requests, records):
            request_records = taught(request_records, first_step=request.steps == 0)
            request.steps += 1
            for r in request_records:
                if isinstance(r, TimingRecord):
                    level_seconds += r.seconds
                    rounds += self._observe_timing(r, request.klass)
                elif isinstance(r, VerifyRecord):
                    self._observe_verdict(request.klass, r)
            for drafter, asked, held in self.middle_blocks(request_records):
                self.acceptance.observe_draft(request.klass, drafter, asked, held)
            self.teach(request.own, request_records)
        for t in timings:
            level_seconds += t.seconds
            rounds += self._observe_timing(t, requests[0].klass if alone else POOLED)
        self._exploring.clear()
        self._explored = False
        if alone and rounds and seconds is not None:
            per_round = max(0.0, seconds - level_seconds) / rounds
            self.overhead_s += 0.2 * (per_round - self.overhead_s)

    def _observe_timing(self, t: TimingRecord, klass: str) -> int:
        """One level call's cost (its blocks' lengths under `klass`); 1 for a verification round."""
        self._measured(t.level)
        if not self._explored:
            self._probe_every.pop(t.level, None)  # in use: probed and explored at the usual pace once out of use again
        weight = EXPLORE_WEIGHT if t.level in self._exploring else None
        if t.op == "score":
            self.profiler.observe_score(t.level, t.num_tokens, t.seconds, batch=t.batch, weight=weight)
            return 1
        if t.op == "draft":
            self.profiler.observe_draft(t.level, t.num_tokens, t.seconds, batch=t.batch, weight=weight)
            if t.asked:
                self.acceptance.observe_draft(klass, t.level, t.asked, t.num_tokens)
        elif t.op == "prefill" and t.context:  # its catch-up: the call's time less the drafting it also did
            drafting = self._draft_cost(t.level, t.num_tokens, t.batch) if t.num_tokens else 0.0
            self.profiler.observe_prefill(t.level, t.context, t.seconds - drafting)
        return 0

    def _measured(self, level: str) -> None:
        """A pass of `level` ran this step: its cost, and that of every level on its device, is up to date."""
        for name in (level, *self._guests.get(level, ())):
            self._last_measured[name] = self._step

    def teach(self, own: OwnAcceptance, records: list) -> None:
        """A request's own acceptance learns its step's records: each pair's agreement and rounds, and
        the blocks of its drafters (drafted at the bottom, or passed up from the middle)."""
        for r in records:
            if isinstance(r, VerifyRecord):
                own.observe(r.drafter, r.verifier, r.alphas)
                own.observe_round(r.drafter, r.verifier, r.num_draft_tokens, r.num_accepted_tokens, r.num_asked)
            elif isinstance(r, TimingRecord) and r.op == "draft" and r.asked:
                own.observe_draft(r.level, r.asked, r.num_tokens)
        for drafter, asked, held in self.middle_blocks(records):
            own.observe_draft(drafter, asked, held)

    def middle_blocks(self, records: list) -> list[tuple[str, int, int]]:
        """(level, asked, held) of each block a stopping level passed up from the middle of a chain (it
        verified a level below in the same step). It stops as it does drafting, so these count with
        its drafted blocks (AcceptanceTable.observe_draft) and a chain with it in the middle is charged
        for the blocks it really holds."""
        verifiers = {r.verifier for r in records if isinstance(r, VerifyRecord) and not r.replayed}
        return [(r.drafter, r.num_asked, r.num_draft_tokens) for r in records
                if isinstance(r, VerifyRecord) and not r.replayed and r.drafter in verifiers and r.drafter in self.stopping and r.num_asked]

    def _observe_verdict(self, klass: str, r: VerifyRecord) -> None:
        """One verification's feedback: the pair's acceptance, and the round's run."""
        self._last_measured[(r.drafter, r.verifier)] = self._step
        if not self._explored and not r.replayed:
            self._probe_every.pop((r.drafter, r.verifier), None)  # in use
        if r.replayed:  # its replays stand for its other verifiers (_estimated_as): none of them is explored blindly
            self._replayed.add(r.drafter)
            for pair in self._pairs:
                if pair[0] == r.drafter:
                    self._last_measured[pair] = self._step
        self.acceptance.observe(klass, r.drafter, r.verifier, r.alphas)
        self.acceptance.observe_round(klass, r.drafter, r.verifier, r.num_draft_tokens, r.num_accepted_tokens, r.num_asked)

    def _probe(self, name: str) -> None:
        """Time one small pass of a level (a throwaway sequence of one token) and record it as fresh news:
        a verifier's pass over 2 tokens (the token and one drafted) as the 2-token score it is, and any
        level's as the time to draft a token (one short pass), so a level's drafting cost follows its
        probes too, not only its one calibration pass, and a level-wide change shows in two observations
        at once. No more context than that: a pass that also prefills context reads as a slower level
        (it would charge a drafted token the time of a short prefill)."""
        level, params = self._levels[name], SamplingParams()
        seq = SequenceState.new(f"probe-{name}-{self._step}", [1])
        predicted = self._verify_cost(name, 2) if level.can_verify else self._draft_cost(name)
        try:
            t0 = time.perf_counter()
            if level.can_verify:
                level.score([ScoreItem(seq, list(seq.token_ids), [1], params)])
                self.profiler.observe_score(name, 2, time.perf_counter() - t0, weight=EXPLORE_WEIGHT)
            else:
                level.propose([ProposeItem(seq, list(seq.token_ids), 1, params, seed=0)])
            seconds = time.perf_counter() - t0
            self.profiler.observe_draft(name, 1, seconds, weight=EXPLORE_WEIGHT)
        finally:
            level.release(seq.seq_id)
        every = self._probe_every.get(name, self.config.explore_every)
        as_predicted = 1 / LEVEL_CHANGE < seconds / max(predicted, 1e-9) < LEVEL_CHANGE
        self._probe_every[name] = min(2 * every, PROBE_BACKOFF * self.config.explore_every) if as_predicted else self.config.explore_every


def taught(records: list, first_step: bool) -> list:
    """What a request's step teaches the router and the request: all its records, but at its first step
    (which also prefills every level) no verdicts. A response's first tokens are drafted worse than the
    rest, and one such round in a request's own rounds would plan its next steps for far fewer tokens
    a round than it then gets."""
    return [r for r in records if not isinstance(r, VerifyRecord)] if first_step else records


def _lengthened(plan: Plan) -> Plan:
    """An exploration's plan: blocks of at least 3 (`AdaptiveRouter._exploration`)."""
    return Plan(plan.chain, tuple(max(3, g) for g in plan.draft_lens), plan.predicted_s_per_token)


def _runs(chain: tuple[str, ...], item: str | tuple[str, str]) -> bool:
    """Whether a chain runs a level, or a (drafter, verifier) pair as neighbours."""
    return item in chain if isinstance(item, str) else any(pair == item for pair in zip(chain, chain[1:]))


def shared_devices(names: list[str]) -> dict[str, str]:
    """Level -> the level whose device it runs on: a skip-layer view runs on the worker of its model's
    full level at the same quantisation (one worker per model and quantisation: specrouter/runtime/actors.py),
    where that level is in the pool too."""
    specs = {name: LevelSpec.parse(name) for name in names}
    full = {(s.model, s.quant): name for name, s in specs.items() if s.skip_layers is None}
    return {name: full[(s.model, s.quant)] for name, s in specs.items() if s.skip_layers is not None and (s.model, s.quant) in full}


def sibling_pairs(names: list[str]) -> frozenset[tuple[str, str]]:
    """(lower, upper) pairs of levels that differ only by a task's adapter (a model and its aligned
    copies): they cost the same a pass, so one verifying the other's block costs about what drafting
    it does, and the chain pays a middle level's passes for nothing (docs/routing.md). Each still
    drafts for any other level."""
    specs = {name: LevelSpec.parse(name) for name in names}
    return frozenset((a, b) for a in names for b in names if a != b and specs[a].model == specs[b].model
                     and (specs[a].quant, specs[a].skip_layers) == (specs[b].quant, specs[b].skip_layers)
                     and specs[a].task != specs[b].task)
