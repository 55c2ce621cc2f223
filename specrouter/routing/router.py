"""Adaptive routing: pick, per prompt class, the chain and draft lengths with the lowest predicted
time per token, from costs and acceptances learned online, and re-plan as they move.

The router is shared by all requests (it owns the profiler and the acceptance table per class);
`start()` gives each request a `Route` that the engine asks for a plan before every step and feeds
each step's records to. A route keeps its request's plan and its own acceptance of each pair, so an
easy prompt of a class is planned for what it accepts, not for its class's average. Re-planning
happens every `replan_every` steps with hysteresis (a new request's first plan against the one its
class's last request planned), and at once after a level's cost changed as a whole. Every
`explore_every` steps the least recently measured drafter (else pair of neighbours) is re-measured,
so estimates of levels out of use (a drafter that slowed down and recovered) stay fresh: its best
plan runs once if it is predicted close to the best, else one small timed pass of the level (a
probe) refreshes its cost without running a slow chain (less and less often while probes find that
cost unchanged); a level on the device of a level in use (a skip-layer view of the target's
weights) needs no probe, as its costs follow that level's. An n-gram drafter's cost and its
acceptance need neither: the engine replays it against the target on every step
(specrouter/core/shadow.py), and those replays stand for its acceptance by every verifier.
Calibration at start measures every level's cost, then every pair's acceptance on the target's own
continuation of a short prompt per class.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specrouter.routing.acceptance import POOLED, AcceptanceTable, OwnAcceptance, rejection_ratio
from specrouter.core.chain import drafted
from specrouter.engine.frontend import chat_ids
from specrouter.core.levels import Level, NgramLevel, ProposeItem, ScoreItem
from specrouter.core.records import TimingRecord, VerifyRecord
from specrouter.routing.profiler import LEVEL_CHANGE, ForwardProfiler
from specrouter.core.sampling import SamplingParams
from specrouter.routing.scheduler import Plan, predict, search, search_batch
from specrouter.core.sequence import SequenceState
from specrouter.core.spec import LevelSpec

if TYPE_CHECKING:
    from specrouter.engine.engine import Engine


EXPLORE_WEIGHT = 0.8  # an exploratory measurement is fresh news about a level out of use
PROBE_BACKOFF = 4  # a level whose probes keep confirming its cost is probed at most this many times less often
CALIBRATION_ROUNDS = 10.0  # what the calibration text's blocks are worth, in verification rounds
CALIBRATION_BLOCK = 8  # the blocks calibration simulates (from every other position of its text)

# A prompt per class; at start the target's own greedy continuation of each (CALIBRATION_TOKENS, one
# routed generation) is the text on which every level's greedy agreement with every other is measured
# (teacher-forced: one pass per level), so the first requests of a class start from measured
# acceptances, not from a blind prior. The target's own output, not a fixed text: on a text it would
# not have written, drafter and target agree far less often than on what they will really verify
# (a fixed chat text gave 0.51 for 0.5B -> 1.5B, where chat requests accept 0.96).
CALIBRATION_PROMPTS = {
    "code": 'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one sorted list."""\n',
    "chat": "How can I sleep better? Give me a few practical tips.",
    "summarization": (
        "Summarize the following in two sentences. The company's revenue grew by 12% last year, mainly thanks to "
        "strong sales in Europe and Asia. Costs rose faster than expected because of higher energy prices and new "
        "hires. The board plans to cut spending on marketing and to invest more in research next year."
    ),
}
CALIBRATION_TOKENS = 32


@dataclass(frozen=True)
class RouterConfig:
    replan_every: int = 2  # steps between re-plans
    hysteresis: float = 0.05  # switch only when the best plan is predicted this much faster
    explore_every: int = 12  # steps after which a level (else a pair) not measured since gets one exploratory step
    explore_margin: float = 1.2  # ... if its best plan is predicted at most this much slower than the best (else a probe)
    batch_speculation_margin: float = 0.1  # a batch speculates only if predicted at least this much faster than
    # plain batched decoding: predictions are ~15% off, and at a large batch a wrong bet slows every request
    max_drafters: int = 3
    lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)
    default_cost_s: float = 0.05  # cost assumed for a level never measured


@dataclass
class PlanState:
    """The plan a request runs, and how long it has run it."""

    plan: Plan | None = None
    steps_since_plan: int = 0
    level_changes: int = 0  # the profiler's level-wide changes when it was planned (ForwardProfiler.changes)


class AdaptiveRouter:
    def __init__(self, pool: list[str], target: str, can_verify: dict[str, bool], config: RouterConfig = RouterConfig(),
                 levels: dict[str, Level] | None = None, stopping: frozenset[str] = frozenset(),
                 hosts: dict[str, str] | None = None, max_top_len: int | None = None):
        """`levels`: the pool's levels by name, to probe a stale level's cost directly (calibrate() sets it).
        `stopping`: drafters that end their blocks unsure (at every level of a chain: specrouter/core/chain.py).
        `hosts`: level -> the level whose device it runs on (a skip-layer view of its weights: `shared_devices`).
        `max_top_len`: the longest block the target verifies (its `max_block`; None: any)."""
        self.pool, self.target = list(pool), target  # pool: drafters, cheapest first
        self.max_top_len = max_top_len
        self.can_verify = can_verify
        self.stopping = stopping
        self.config = config
        self.profiler = ForwardProfiler()
        self.acceptance = AcceptanceTable()
        self.overhead_s = 0.0  # per-round time outside level calls (EMA)
        self._step = 0
        names = self.pool + [target]
        self._pairs = [(d, v) for i, d in enumerate(self.pool) for v in names[i + 1:] if can_verify.get(v, True)]
        self._last_measured: dict[str | tuple[str, str], int] = {item: 0 for item in names + self._pairs}  # level or pair -> step
        self._exploring: set[str] = set()  # levels whose next measurement replaces most of the old one
        # steps between probes of a level out of use: doubled (up to PROBE_BACKOFF x explore_every) each time a
        # probe finds its cost as predicted, since each costs a pass of that level (0.17 s for the 1.5B-skip here,
        # ~4% of a mixed workload's time); back to explore_every once a probe finds it changed or a chain runs it
        self._probe_every: dict[str, int] = {}
        self._levels: dict[str, Level] = levels if levels is not None else {}
        # per class, the plan its last request planned: a new request starts from it with the same hysteresis
        # (two chains a few % apart in the model are near ties: one request's estimates must not flip them)
        self._incumbent: dict[str, Plan] = {}
        self._replayed: set[str] = set()  # drafters replayed against the target on every step (_estimated_as)
        # a level on another's device is measured whenever that one runs: its costs follow the other's
        # level-wide changes (ForwardProfiler.share), so it is never probed while the other runs (the
        # 1.5B-skip's probes, each a 0.13-0.17 s pass, were 1% of a mixed workload's time while the 1.5B
        # it shares ran every step)
        self._guests: dict[str, list[str]] = {}
        for level, host in (hosts or {}).items():
            self.profiler.share(level, host)
            self._guests.setdefault(host, []).append(level)

    # -- the latency model's inputs ---------------------------------------------------------------------

    def _verify_cost(self, level: str, num_tokens: int, batch: int = 1) -> float:
        t = self.profiler.score_time(level, num_tokens, batch)
        return t if t is not None else self.config.default_cost_s

    def _draft_cost(self, level: str, batch: int = 1) -> float:
        t = self.profiler.draft_time(level, batch)
        if t is not None:
            return t
        single = self.profiler.score_time(level, 1, batch)  # a model drafts one token per single-token pass
        return single if single is not None else self.config.default_cost_s

    def plans(self, klass: str, own: OwnAcceptance | None = None) -> list[Plan]:
        """Every chain's best plan for a request of `klass`, best first; `own`: the request's own
        acceptance and blocks, where it has run some."""
        return search(
            self.pool,
            self.target,
            verify=self._verify_cost,
            draft=self._draft_cost,
            alpha=self._alpha([klass]),
            overhead=self.overhead_s,
            can_verify=lambda name: self.can_verify.get(name, True),
            lengths=self.config.lengths,
            max_drafters=self.config.max_drafters,
            max_top_len=self.max_top_len,
            expected=self._expected([klass], self._own_ratios(klass, own), own),
            drafted=self._drafted([klass], own),
            # drafters that stop unsure propose up to the longest length, unsearched: their block length is a cap
            # that binds only while they stay sure, and the model's rates at deep positions rest on few rounds
            # (bench: ngram -> 0.5B -> 1.5B [3, 10] ran 7% faster on code than the [2, 8] / [4, 5] it picked)
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
        of a text: agreement 0.97 on the tokens it was sure of, against a class alpha of 0.72, is a
        ratio of 0.11, nine in ten of the class's rejections taken away at every position)."""
        by_length: dict[tuple[str, str], list[float]] = {}  # (drafter, verifier) -> [E(0), ..., E(longest)]

        def expected(d: str, v: str, g: int) -> float:
            if len(by_length.get((d, v), ())) <= g:
                stops, pair = d in self.stopping, self._estimated_as(d, v)
                ratio = 1.0 if stops else (ratios or {}).get(pair, 1.0)
                request = own.runs.get(pair) if own and stops else None
                n = max(g, *self.config.lengths)
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
        whose early requests ran without it kept the acceptance calibration gave n-gram -> 0.5B
        (code: 0.017) while its replays against the 1.5B had learned 0.3-0.8, and never ran
        n-gram -> 0.5B -> 1.5B, 4.5% faster than 0.5B -> 1.5B on code (bench)."""
        return (drafter, self.target) if drafter in self._replayed else (drafter, verifier)

    def _drafted(self, classes: list[str], own: OwnAcceptance | None = None):
        """(drafter, n) -> tokens a block asked for n holds, averaged over the classes (and following a
        request's `own` blocks where it has run some); fewer than n for one that stops unsure."""
        by_length: dict[str, list[float]] = {}  # drafter -> [D(0), ..., D(longest)]

        def drafted(level: str, n: int) -> float:
            if len(by_length.get(level, ())) <= n:
                request = own.drafts.get(level) if own else None
                longest = max(n, *self.config.lengths)
                per_class = [self.acceptance.expected_drafted_by_length(k, level, longest, request) for k in classes]
                by_length[level] = [sum(d) / len(classes) for d in zip(*per_class)]
            return by_length[level][n]
        return drafted

    # -- planning ---------------------------------------------------------------------------------------

    def plan_for(self, klass: str, backlog: dict[str, int] | None = None, remaining: float = float("inf"),
                 own: OwnAcceptance | None = None, state: PlanState | None = None) -> tuple[Plan, list[Plan], str]:
        """The plan for the next step of a request of `klass`, the ranked candidates, and why.
        `backlog` / `remaining`: as for `plan_for_batch` (a drafter that has fallen behind the request's
        context is charged its catch-up prefill, spread over the tokens still to generate). `own`:
        the request's own acceptance of the pairs and blocks of the drafters it ran. `state`:
        the request's plan so far, for hysteresis (default: none yet, and the plan its class's last
        request planned stands in for it)."""
        state = state if state is not None else PlanState()
        stale = self._stalest()
        if stale is not None:
            ranked = self._ranked(klass, backlog, remaining, own)
            explore = next((p for p in ranked if _runs(p.chain, stale)), None)
            promising = explore is not None and explore.predicted_s_per_token <= ranked[0].predicted_s_per_token * self.config.explore_margin
            self._last_measured[stale] = self._step
            if not promising and stale in self._levels:
                # Far behind: re-measure its cost with one small pass instead of running a slow chain.
                self._probe(stale)
            elif promising or (explore is not None and isinstance(stale, str)):  # a level we cannot probe: run it
                explore = self._exploration(explore)
                if isinstance(stale, str):
                    self._exploring.add(stale)
                what = stale if isinstance(stale, str) else " -> ".join(stale)
                return explore, ranked, f"explore: {what} not measured for {self.config.explore_every}+ steps"
        if (state.plan is not None and state.steps_since_plan < self.config.replan_every
                and state.level_changes == self.profiler.changes):  # a level slowed or recovered since: re-plan now
            state.steps_since_plan += 1
            # the same plan, its prediction brought up to date with the request's latest rounds (what the
            # response's explanation compares with the time measured: a short request has few steps)
            state.plan = self._repredict(state.plan, klass, own)
            return state.plan, [], "keep"
        ranked = self._ranked(klass, backlog, remaining, own)
        best = ranked[0]
        reason = "best predicted"
        previous = state.plan if state.plan is not None else self._incumbent.get(klass)
        if previous is not None and best.chain + best.draft_lens != previous.chain + previous.draft_lens:
            current = self._repredict(previous, klass, own)
            if backlog:
                current = self._with_catch_up(current, backlog, remaining)
            if best.predicted_s_per_token > current.predicted_s_per_token * (1 - self.config.hysteresis):
                best, reason = current, "hysteresis: best is not enough faster"
        state.plan, state.steps_since_plan, state.level_changes = best, 1, self.profiler.changes
        self._incumbent[klass] = best
        return best, ranked, reason

    def _ranked(self, klass: str, backlog: dict[str, int] | None, remaining: float,
                own: OwnAcceptance | None = None) -> list[Plan]:
        return self._charge_catch_up(self.plans(klass, own), backlog, remaining)

    def _charge_catch_up(self, plans: list[Plan], backlog: dict[str, int] | None, remaining: float) -> list[Plan]:
        """The plans re-ranked with each one's catch-up prefill added (see plan_for_batch)."""
        if not backlog:
            return plans
        return sorted((self._with_catch_up(p, backlog, remaining) for p in plans), key=lambda p: p.predicted_s_per_token)

    def _repredict(self, plan: Plan, klass: str, own: OwnAcceptance | None = None) -> Plan:
        ratios = self._own_ratios(klass, own)
        t = predict(plan.chain, plan.draft_lens, self._verify_cost, self._draft_cost, self._alpha([klass]),
                    self.overhead_s, self._expected([klass], ratios, own), self._drafted([klass], own))
        return Plan(plan.chain, plan.draft_lens, t)

    def _exploration(self, plan: Plan) -> Plan:
        """The plan run to explore: long enough blocks that one step measures acceptance, not just cost.
        It measures every level and pair it runs, so none of them is explored again at once."""
        for item in (*plan.chain, *zip(plan.chain, plan.chain[1:])):
            self._last_measured[item] = self._step
        return Plan(plan.chain, tuple(max(3, g) for g in plan.draft_lens), plan.predicted_s_per_token)

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

    # -- feedback ---------------------------------------------------------------------------------------

    def observe(self, klass: str, records: list, step_seconds: float) -> None:
        self._step += 1
        level_seconds = 0.0
        rounds = 0
        for r in records:
            if isinstance(r, TimingRecord):
                level_seconds += r.seconds
                self._measured(r.level)
                self._probe_every.pop(r.level, None)  # in use: probed at the usual pace once out of use again
                weight = EXPLORE_WEIGHT if r.level in self._exploring else None
                if r.op == "score":
                    rounds += 1
                    self.profiler.observe_score(r.level, r.num_tokens, r.seconds, weight=weight)
                elif r.op == "draft":
                    self.profiler.observe_draft(r.level, r.num_tokens, r.seconds, weight=weight)
                    if r.asked:
                        self.acceptance.observe_draft(klass, r.level, r.asked, r.num_tokens)
            elif isinstance(r, VerifyRecord):
                self._observe_verdict(klass, r)
        for drafter, asked, held in self.middle_blocks(records):
            self.acceptance.observe_draft(klass, drafter, asked, held)
        self._exploring.clear()
        if rounds:
            per_round = max(0.0, step_seconds - level_seconds) / rounds
            self.overhead_s += 0.2 * (per_round - self.overhead_s)

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
        if r.replayed:  # its replays stand for its other verifiers (_estimated_as): none of them is explored blindly
            self._replayed.add(r.drafter)
            for pair in self._pairs:
                if pair[0] == r.drafter:
                    self._last_measured[pair] = self._step
        self.acceptance.observe(klass, r.drafter, r.verifier, r.alphas)
        self.acceptance.observe_round(klass, r.drafter, r.verifier, r.num_draft_tokens, r.num_accepted_tokens, r.num_asked)

    # -- batches (specrouter/engine/loop.py) --------------------------------------------------------------

    def plan_for_batch(self, classes: list[str], backlog: dict[str, int] | None = None, remaining: float = float("inf")) -> Plan:
        """The chain and draft lengths with the best goodput for a batch of requests of these classes
        (acceptance averaged over them), from the costs profiled at this batch size.

        `backlog[level]`: context tokens (summed over the batch) a level has not cached, which it must
        prefill before it can draft: a drafter left idle while the batch was large has fallen behind.
        That one-off cost is spread over the `remaining` tokens each sequence still has to generate,
        so a far-behind drafter returns only when it will pay for its catch-up.

        Every `explore_every` steps a drafter not measured since runs once if its best plan is predicted
        within `explore_margin` of the best, so an acceptance learned while speculation was off (or
        never learned: the prior) is checked again and speculation can return when it pays."""
        ranked = search_batch(
            self.pool,
            self.target,
            len(classes),
            verify=self._verify_cost,
            draft=self._draft_cost,
            alpha=self._alpha(classes),
            overhead=self.overhead_s,
            can_verify=lambda name: self.can_verify.get(name, True),
            lengths=self.config.lengths,
            max_drafters=self.config.max_drafters,
            max_top_len=self.max_top_len,
            expected=self._expected(classes),
            drafted=self._drafted(classes),
        )
        ranked = self._charge_catch_up(ranked, backlog, remaining)
        plain = next(p for p in ranked if len(p.chain) == 1)
        if ranked[0] is not plain and ranked[0].predicted_s_per_token > plain.predicted_s_per_token * (1 - self.config.batch_speculation_margin):
            ranked = [plain] + [p for p in ranked if p is not plain]  # too close to call: the safe plan
        stale = self._stalest()
        if stale is not None:
            self._last_measured[stale] = self._step
            explore = next((p for p in ranked if _runs(p.chain, stale)), None)
            if explore is not None and explore.predicted_s_per_token <= ranked[0].predicted_s_per_token * self.config.explore_margin:
                return self._exploration(explore)
        return ranked[0]

    def _with_catch_up(self, plan: Plan, backlog: dict[str, int], remaining: float) -> Plan:
        seconds = sum(self.profiler.prefill_time(level, backlog[level]) or 0.0 for level in plan.chain[:-1] if backlog.get(level))
        return Plan(plan.chain, plan.draft_lens, plan.predicted_s_per_token + seconds / max(remaining, 1.0))

    def sequence_draft_lens(self, plan: Plan, classes: list[str], alphas: list[float | None],
                            owns: list[OwnAcceptance | None] | None = None) -> list[int]:
        """Each sequence's draft length at the top of `plan`: the length (at most the plan's) that its
        own acceptance of the top pair pays for at this batch size; None: its class's estimate. For
        a drafter that stops unsure, whose agreement ratio `_expected` leaves out, its own rounds and
        blocks (`owns`, as a routed request's: `teach`) where it has run some, else its class's.
        The batch's pass is ragged (specrouter/core/model.py forward_batch), so a shorter block costs less."""
        if len(plan.chain) < 2:
            return [0] * len(classes)
        batch, top = len(classes), (plan.chain[-2], plan.chain[-1])
        class_alpha = self._alpha(classes)
        lens = []
        for alpha, own in zip(alphas, owns or [None] * len(alphas)):
            ratio = rejection_ratio(alpha, class_alpha(*top)) if alpha is not None else 1.0
            expected, drafted = self._expected(classes, {top: ratio}, own), self._drafted(classes, own)
            candidates = [g for g in self.config.lengths if g <= plan.draft_lens[-1]] or [plan.draft_lens[-1]]
            lens.append(min(candidates, key=lambda g: predict(plan.chain, plan.draft_lens[:-1] + (g,),
                                                              lambda level, n: self._verify_cost(level, n, batch),
                                                              lambda level: self._draft_cost(level, batch), class_alpha,
                                                              self.overhead_s, expected, drafted)))
        return lens

    def observe_batch(self, records: list[tuple[str, list]], timings: list[TimingRecord]) -> None:
        """One batched step's feedback: each request's (class, records) and the batch's level timings."""
        self._step += 1
        for klass, request_records in records:
            for r in request_records:
                if isinstance(r, VerifyRecord):
                    self._observe_verdict(klass, r)
        for t in timings:
            self._measured(t.level)
            if t.op == "score":
                self.profiler.observe_score(t.level, t.num_tokens, t.seconds, batch=t.batch)
            elif t.op == "draft":
                self.profiler.observe_draft(t.level, t.num_tokens, t.seconds, batch=t.batch)
                if t.asked:
                    self.acceptance.observe_draft(POOLED, t.level, t.asked, t.num_tokens)

    def calibrate_batches(self, levels: dict[str, Level], batches: tuple[int, ...] = (1, 4, 16),
                          lengths: tuple[int, ...] = (1, 2, 4, 8), context: int = 32) -> None:
        """Seed the profiles at several batch sizes with batched passes over throwaway sequences."""
        from specrouter.engine.loop import calibration_passes

        for name, level in levels.items():
            for batch in batches:
                for op, num_tokens, seconds in calibration_passes(level, batch, lengths, context):
                    if op == "score":
                        self.profiler.observe_score(name, num_tokens, seconds, batch=batch)
                    else:
                        self.profiler.observe_draft(name, num_tokens, seconds, batch=batch)

    def start(self, klass: str) -> "Route":
        return Route(self, klass)

    def calibrate_acceptance(self, klass: str, ids: list[int], start: int = 1) -> None:
        """Every level's greedy next-token choice along `ids` (teacher-forced, one pass per model
        level; prompt lookup for n-gram levels); each (drafter, verifier) pair in pool order is
        observed into the class's table as the rounds it would run over ids[start:]: a block of up
        to CALIBRATION_BLOCK from every other position, accepted while their choices agree.

        A drafter that stops unsure ends a block after a token it gave less than its min_confidence
        (its confidence along the text, as it drafts), as its real rounds do: the positions it would
        not draft count as its first missing one does (AcceptanceTable.observe_round), and its alpha
        is its agreement where it would draft, as the verdicts on its real blocks measure it (its
        agreement over every position is lower: it is unsure where it disagrees)."""
        params = SamplingParams()
        choices: dict[str, torch.Tensor] = {}  # level -> [T] argmax token after ids[:t+1], for ids[start:]
        sure: dict[str, list[bool]] = {}  # a level that stops unsure -> [T] whether it drafts on after that token
        for name in [*self.pool, self.target]:
            level = self._levels[name]
            if level.can_verify:
                seq = SequenceState.new(f"calibrate-alpha-{name}-{klass}", ids[:1])
                try:
                    (scored,) = level.score([ScoreItem(seq, ids[:1], ids[1:], params, confident=name in self.stopping)])
                    if name in self.stopping:  # scored.top [T_all]
                        sure[name] = [float(c) >= level.min_confidence for c in scored.top[start - 1 : -1]]
                    choices[name] = scored.p.argmax(-1)[start - 1 : -1]  # [T] (p [T_all, V])
                finally:
                    level.release(seq.seq_id)
            elif isinstance(level, NgramLevel):
                choices[name] = torch.tensor([(level.lookup(ids[: t + 1], 1) or [-1])[0] for t in range(start - 1, len(ids) - 1)])
        order = [n for n in [*self.pool, self.target] if n in choices]
        for i, drafter in enumerate(order):
            for verifier in order[i + 1:]:
                if self._levels[verifier].can_verify:
                    agreed = (choices[drafter] == choices[verifier]).tolist()  # [T]
                    rounds = calibration_rounds(agreed, sure.get(drafter))
                    if drafter in sure:  # the tokens its blocks accepted, of those judged (accepted, and each first rejected)
                        accepted = sum(a for _, _, a in rounds)
                        alpha = accepted / max(1, accepted + sum(a < d for _, d, a in rounds))
                    else:
                        alpha = sum(agreed) / max(1, len(agreed))
                    self.acceptance.observe(klass, drafter, verifier, [alpha] * len(agreed))
                    # the rounds, all of them together worth CALIBRATION_ROUNDS rounds: one short text is a
                    # hint, and the rounds really run must soon outweigh it
                    for asked, drafted, accepted in rounds:
                        self.acceptance.observe_round(klass, drafter, verifier, drafted, accepted, asked,
                                                      weight=CALIBRATION_ROUNDS / len(rounds))

    def _probe(self, name: str) -> None:
        """Time one small pass of a level (a throwaway sequence of one token) and record it as fresh news:
        a verifier's pass over 2 tokens (the token and one drafted) as the 2-token score it is, and any
        level's as the time to draft a token (one short pass), so a level's drafting cost follows its
        probes too, not only its one calibration pass, and a level-wide change shows in two observations
        at once. No more context than that: a pass that also prefills context reads as a slower level
        (a probe over 8 tokens of context charged the 0.5B 0.041 s a drafted token, which it drafts in
        0.03 s)."""
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

    def calibrate(self, levels: dict[str, Level], lengths: tuple[int, ...] = (1, 2, 4, 8), context: int = 32) -> None:
        """Seed the profiles with a few passes of every level over a throwaway sequence. `levels` is kept
        (by reference: a replaced level is seen) to probe stale levels' costs later and to measure
        acceptance (calibrate_acceptance)."""
        self._levels = levels
        params = SamplingParams()
        for name, level in levels.items():
            seq = SequenceState.new(f"calibrate-{name}", list(range(1, context + 1)))
            ctx = list(seq.token_ids)
            try:
                if level.can_verify:
                    level.score([ScoreItem(seq, ctx[:-1], [], params)])  # prefill, not profiled
                    for n in lengths:
                        t0 = time.perf_counter()
                        level.score([ScoreItem(seq, ctx, list(range(2, n + 1)), params)])
                        self.profiler.observe_score(name, n, time.perf_counter() - t0)
                t0 = time.perf_counter()
                (block,) = level.propose([ProposeItem(seq, ctx, 4, params, seed=0)])
                # per token drafted: one that stops unsure drafts fewer (an n-gram without a match, none: a call's cost)
                self.profiler.observe_draft(name, max(1, drafted(block, 4)), time.perf_counter() - t0)
            finally:
                level.release(seq.seq_id)


def calibration_rounds(agreed: list[bool], sure: list[bool] | None = None) -> list[tuple[int, int, int]]:
    """(asked, drafted, accepted) of a block of up to CALIBRATION_BLOCK (as much as the text has left)
    from every other position of a text along which a drafter's choices `agreed` with its
    verifier's; with `sure` (a drafter that stops unsure: whether it drafts on after each
    position's token), each block ends after its first unsure token, as its drafting does."""
    rounds = []
    for t in range(0, len(agreed), 2):
        asked = drafted = min(CALIBRATION_BLOCK, len(agreed) - t)
        if sure is not None:
            drafted = next((j + 1 for j in range(asked) if not sure[t + j]), asked)
        accepted = next((j for j in range(drafted) if not agreed[t + j]), drafted)
        rounds.append((asked, drafted, accepted))
    return rounds


def taught(records: list, first_step: bool) -> list:
    """What a request's step teaches the router and the request: all its records, but at its first step
    (which also prefills every level) no verdicts. A response's first tokens are drafted worse than the
    rest (bench prompts: 2.9 tokens a step at the first, 4.6 after), and one such round in a request's
    own rounds planned its next steps for 4 tokens a round where it then got 11."""
    return [r for r in records if not isinstance(r, VerifyRecord)] if first_step else records


def _runs(chain: tuple[str, ...], item: str | tuple[str, str]) -> bool:
    """Whether a chain runs a level, or a (drafter, verifier) pair as neighbours."""
    return item in chain if isinstance(item, str) else any(pair == item for pair in zip(chain, chain[1:]))


def router_for(engine: "Engine", config: RouterConfig = RouterConfig(), calibrate: bool = True) -> AdaptiveRouter:
    """A router over an engine's pool: every level but the last is a drafter candidate."""
    names = list(engine.levels)
    stopping = frozenset(n for n, level in engine.levels.items() if level.min_confidence > 0)
    router = AdaptiveRouter(names[:-1], names[-1], {n: level.can_verify for n, level in engine.levels.items()}, config,
                            stopping=stopping, hosts=shared_devices(names), max_top_len=engine.levels[names[-1]].max_block)
    if calibrate:
        router.calibrate(engine.levels)
        for klass, prompt in CALIBRATION_PROMPTS.items():
            ids = _calibration_ids(engine.tokenizer, prompt, chat=klass != "code")
            continuation = engine.generate(ids, CALIBRATION_TOKENS, route=router.start(klass)).token_ids  # its rounds count too
            router.calibrate_acceptance(klass, ids + continuation, start=len(ids))
    return router


def shared_devices(names: list[str]) -> dict[str, str]:
    """Level -> the level whose device it runs on: a skip-layer view runs on the worker of its model's
    full level at the same quantisation (one worker per model and quantisation: specrouter/runtime/actors.py),
    where that level is in the pool too."""
    specs = {name: LevelSpec.parse(name) for name in names}
    full = {(s.model, s.quant): name for name, s in specs.items() if s.skip_layers is None}
    return {name: full[(s.model, s.quant)] for name, s in specs.items() if s.skip_layers is not None and (s.model, s.quant) in full}


def _calibration_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A prompt's token ids, as a chat request's (the tokenizer's chat template) where it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


@dataclass
class Route:
    """One request's view of the router; records what ran for the response's explanation."""

    router: AdaptiveRouter
    klass: str
    _plan: Plan | None = None
    _steps: Counter = field(default_factory=Counter)
    _predicted_s: float = 0.0  # decode steps only: the latency model predicts decoding, not the prefill
    _measured_s: float = 0.0
    _tokens: int = 0  # all committed tokens
    _decode_tokens: int = 0
    _prefill_s: float | None = None  # the first step, which also prefills the prompt on every level
    _decisions: list[dict] = field(default_factory=list)
    _own: OwnAcceptance = field(default_factory=OwnAcceptance)  # this request's acceptance of each pair it ran
    _state: PlanState = field(default_factory=PlanState)

    def next_plan(self, backlog: dict[str, int] | None = None, remaining: float = float("inf")) -> Plan:
        plan, ranked, reason = self.router.plan_for(self.klass, backlog, remaining, self._own, self._state)
        if reason != "keep" and (not self._decisions or self._decisions[-1]["chain"] != list(plan.chain) or reason.startswith("explore")):
            runner_up = next((p for p in ranked if p.chain != plan.chain), None)
            self._decisions.append({
                **plan.as_dict(),
                "reason": reason,
                "runner_up": runner_up.as_dict() if runner_up else None,
                "at_token": self._tokens,
            })
        self._plan = plan
        return plan

    def observe(self, records: list, committed: int, seconds: float) -> None:
        records = taught(records, first_step=self._prefill_s is None)
        self.router.observe(self.klass, records, seconds)
        self.router.teach(self._own, records)
        self._steps[(self._plan.chain, self._plan.draft_lens)] += 1
        self._tokens += committed
        if self._prefill_s is None:
            self._prefill_s = seconds
            return
        self._predicted_s += self._plan.predicted_s_per_token * committed
        self._measured_s += seconds
        self._decode_tokens += committed

    def explain(self) -> dict:
        tokens = max(1, self._decode_tokens)
        return {
            "class": self.klass,
            "predicted_s_per_token": round(self._predicted_s / tokens, 5),  # decode steps (after the first)
            "measured_s_per_token": round(self._measured_s / tokens, 5),
            "first_step_s": round(self._prefill_s or 0.0, 5),  # prefill of every level + the first step
            "steps_by_plan": [
                {"chain": list(chain), "draft_lens": list(lens), "steps": n} for (chain, lens), n in self._steps.most_common()
            ],
            "decisions": self._decisions,
        }
