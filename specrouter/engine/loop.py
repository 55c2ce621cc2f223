"""The generation loop: requests advance together, one speculative step per `step()`; a single
request is a batch of one (Engine.generate runs one through it).

The loop holds the active requests and a queue. Every step it (1) admits queued requests, in order,
up to `max_batch` and while their positions fit in the models' shared KV pools, and prefills the
next chunk of each prompt too long for one step (a prompt's last chunk, or a short prompt whole,
prefills inside the step's batched passes), (2) picks the chain and draft lengths for the batch of
the requests ready to decode, (3) runs one batched speculative step (chain.speculative_step: batched
drafting and batched verification per level, per-sequence verdicts and rollback), (4) commits each
request's tokens and retires the finished ones, releasing their state on every worker. A cancelled
request is retired at once; the others never notice (their caches and versions are their own).

With an AdaptiveRouter (specrouter/routing/router.py) the router plans every step for the requests
in the batch, from the routing state the loop keeps for each (`RequestRoute`): a request alone is
planned for its own acceptance, with hysteresis; a larger batch for the best goodput of the whole
batch, so speculation shrinks and switches off as the batch grows and returns as it shrinks, and
each sequence drafts at the top what its own acceptance pays for. After the step the router learns
each request's verdicts and the step's level timings, and the n-gram drafters the target did not
verify this step are replayed on each request's committed tokens (specrouter/core/shadow.py), so
their acceptance is measured on every step for free. Each result explains its routing: the plans it
ran and why, the predicted and measured seconds per token. Without a router every step runs the
engine's static chain (fixed draft lengths; a one-level chain is plain batched decoding).

A batch holding a request in tiered (lossy) verification mode runs a tiered step
(specrouter/core/tiered.py) on the static chain; with a router, on the router's chain where it
drafts, and only while the router's `tiering` measures tiered steps faster than lossless ones
(specrouter/routing/tiering.py): a tiered request does not run slower than its lossless plan for
long, and what it commits in lossless steps is the target's (tier 3).
The router learns acceptance and costs from lossless steps only: a tiered step sends the target only
its least confident blocks, and with them the tokens it catches up on.

Admission is bounded: with `max_waiting` (and `max_waiting_tokens`), `submit` refuses a request
that would wait, behind a full batch, with that many requests (prompt tokens) already waiting, by
raising Overloaded at once; a request once queued is never dropped. A request with a deadline
(`timeout_s`) still unfinished when it passes is retired with finish_reason "timeout", its state
freed on every worker like a cancelled one's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from specrouter.core.chain import Chain, StepContext, decode_run, speculative_step, top_block_lens
from specrouter.core.levels import NgramLevel
from specrouter.core.model import KVPool
from specrouter.core.pipeline import DraftAhead, pipelined_step
from specrouter.core.records import LevelStats, TimingRecord, VerifyRecord
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState
from specrouter.core.tiered import tiered_step
from specrouter.core.tiers import TIER_TARGET, AgreementLog, QualityBudget, Thresholds, TierCounts
from specrouter.core.shadow import shadow_records
from specrouter.core.worker import WorkerUnavailable
from specrouter.engine.defaults import DECODE_RUN_S, MAX_BATCH, PREFILL_CHUNK
from specrouter.engine.request import Overloaded
from specrouter.routing.router import AdaptiveRouter, Decision, RequestRoute

SHADOW_BLOCK = 10  # the block length an n-gram drafter is replayed with
MAX_RUN = 16  # the most tokens a step of plain decoding runs in one call to the target


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" (end token or stop string), "length", "cancelled" or "timeout"
    elapsed_s: float
    num_steps: int  # target verifications
    chain: list[str]
    draft_lens: list[int]
    level_stats: list[LevelStats]
    text: str | None = None
    prompt_tokens: int = 0
    routing: dict | None = None  # which chains ran and why
    tiered: Thresholds | None = None  # opt-in lossy tiered verification ran (None: lossless), at these thresholds last
    tiers: TierCounts | None = None  # with `tiered`: the committed tokens each tier decided
    quality_budget: QualityBudget | None = None  # tiered by a quality budget, its thresholds calibrated as it ran

    @property
    def lossy(self) -> bool:
        """The output may differ from the target's alone (tiered verification with a tier below the
        target, or by a quality budget)."""
        return self.quality_budget is not None or (self.tiered is not None and not self.tiered.lossless)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "num_target_steps": self.num_steps,
            "tokens_per_target_step": round(len(self.token_ids) / self.num_steps, 3) if self.num_steps else 0.0,
            "chain": self.chain,
            "draft_lens": self.draft_lens,
            "levels": [s.as_dict() for s in self.level_stats],
            **({"routing": self.routing} if self.routing is not None else {}),
            "lossy": self.lossy,
            **({"verification": "tiered", "tau_high": self.tiered.tau_high, "tau_low": self.tiered.tau_low,
                "tiers": self.tiers.as_dict()} if self.tiered is not None else {}),
            **({"max_disagreement": self.quality_budget.max_disagreement} if self.quality_budget is not None else {}),
        }


@dataclass
class _Request:
    request_id: str
    seq: SequenceState
    ctx: StepContext
    max_new_tokens: int
    klass: str
    route: RequestRoute | None  # its routing state, with a router
    deadline: float | None = None  # time.monotonic() past which the request is retired ("timeout")
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    ahead: DraftAhead | None = None  # with pipelining: the block drafted while the last step verified
    # what its routing explanation reports
    chains: Counter = field(default_factory=Counter)  # (chain, draft_lens) -> steps
    decisions: list[dict] = field(default_factory=list)  # every change of chain, why, and the batch size it was made for
    quality_budget: QualityBudget | None = None  # tiered by a budget: its ctx.tiered is calibrated before each step
    tiering: bool | None = None  # in tiered mode with a router: whether its last step tiered
    tiering_decisions: list[dict] = field(default_factory=list)  # ... each change of that, and why
    first_step_s: float | None = None  # the first step, which also prefills the prompt (its last chunk) on every level
    predicted_s: float = 0.0  # decode steps only (after the first): the latency model predicts decoding, not the prefill
    measured_s: float = 0.0
    decode_tokens: int = 0

    @property
    def budget(self) -> int:
        return self.max_new_tokens - len(self.seq.generated)

    def routing(self) -> dict:
        out = {"class": self.klass, "decisions": self.decisions,
               "steps_by_plan": [{"chain": list(c), "draft_lens": list(g), "steps": n} for (c, g), n in self.chains.most_common()],
               **({"tiering": self.tiering_decisions} if self.tiering_decisions else {})}
        if self.route is not None:
            tokens = max(1, self.decode_tokens)
            out.update({"predicted_s_per_token": round(self.predicted_s / tokens, 5),  # decode steps (after the first)
                        "measured_s_per_token": round(self.measured_s / tokens, 5),
                        "first_step_s": round(self.first_step_s or 0.0, 5)})  # prefill of every level + the first step
        return out


@dataclass(frozen=True)
class StepReport:
    committed: dict[str, list[int]]  # request id -> tokens committed this step (end token included)
    finished: dict[str, GenerationResult]  # requests that finished this step
    chain: tuple[str, ...] = ()
    draft_lens: tuple[int, ...] = ()
    batch: int = 0
    seconds: float = 0.0


class BatchLoop:
    def __init__(self, engine, router: AdaptiveRouter | None = None, max_batch: int = MAX_BATCH, pipeline: bool = False,
                 max_waiting: int | None = None, max_waiting_tokens: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 decode_run_s: float = DECODE_RUN_S):
        """`engine`: the Engine (specrouter/engine/engine.py) whose levels and chains run.
        `router`: an AdaptiveRouter choosing each step's plan; None: the static chain.
        `pipeline`: draft each next block while the target verifies (specrouter/core/pipeline.py).
        `max_waiting` / `max_waiting_tokens`: the most requests / prompt tokens that may wait for a
        place in the batch (None: no limit); `submit` refuses what would go past them.
        `prefill_chunk`: the most prompt tokens a step prefills; a longer prompt is prefilled in chunks
        of this many tokens over several steps while the batch goes on decoding.
        `decode_run_s`: a step of plain decoding (nothing drafted) runs as many one-token passes
        on the target in one call as fit in about this many seconds, by the last such step's pace, so
        the per-step work around a pass (the router, the data plane, the stream) is paid once per run;
        tokens then arrive a run at a time. 0: one token a step."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if decode_run_s < 0:
            raise ValueError(f"decode_run_s must be >= 0, got {decode_run_s}")
        self.engine, self.router, self.max_batch, self.prefill_chunk = engine, router, max_batch, prefill_chunk
        self.decode_run_s = decode_run_s
        self._pass_s: float | None = None  # seconds a pass of plain decoding took at the last such step
        # per prompt class and drafter, the target's agreement with drafted tokens by the drafter's confidence:
        # what the thresholds of a request tiered by a quality budget are calibrated on
        self.agreement = AgreementLog()
        # Positions a sequence may hold past its last token: the widest block a step may draft, and one
        # (twice that when pipelined: the drafters run a block ahead).
        longest = max((*engine.chain.draft_lens, router.longest_block() if router is not None else 0), default=0)
        self._headroom = (2 if pipeline else 1) * (longest + 1)
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="verify") if pipeline else None
        self._waiting: list[_Request] = []
        self._active: dict[str, _Request] = {}
        # `submit` may run on other threads while a step runs (BatchServer): the queue has its own lock,
        # and the batch (_active) is changed only by the thread that steps.
        self._queue_lock = threading.Lock()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def submit(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int = 0,
               ignore_eos: bool = False, klass: str = "default", timeout_s: float | None = None,
               request_id: str | None = None, tiered: Thresholds | QualityBudget | None = None) -> str:
        """Queue a request (it joins the batch at the next step); returns its id. `klass`: its prompt
        class, for the router. `tiered`: the opt-in lossy tiered verification mode
        (specrouter/core/tiered.py), by its thresholds or by a quality budget (thresholds calibrated
        before each step on the loop's `agreement` for its class and the step's drafter); None:
        lossless. Raises Overloaded, queueing nothing, if it would wait past `max_waiting` /
        `max_waiting_tokens`."""
        self.engine.check_request(len(prompt_ids), max_new_tokens)
        request_id = request_id or uuid.uuid4().hex
        budget = tiered if isinstance(tiered, QualityBudget) else None
        ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset() if ignore_eos else self.engine.eos_ids,
                          self.engine.new_stats(), tiered=Thresholds(1.0, 1.0) if budget is not None else tiered)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        route = RequestRoute(klass) if self.router is not None else None
        request = _Request(request_id, SequenceState.new(request_id, list(prompt_ids)), ctx, max_new_tokens, klass, route, deadline,
                           quality_budget=budget)
        with self._queue_lock:
            self._admit_or_refuse(request)
            self._waiting.append(request)
        return request_id

    def _admissible(self, queue: list[_Request]) -> int:
        """How many requests at the head of `queue` the next step admits: places left in the batch (and
        in the models' KV pools' sequence slots) and room in the pools for the positions of every request
        (its prompt, its max_tokens and the widest block drafted past them), reserved until it ends.
        An empty batch always takes the first (check_request keeps each request within the pool)."""
        pool = self.engine.kv_pool
        if pool is None:
            return min(max(0, self.max_batch - len(self._active)), len(queue))
        places = max(0, min(self.max_batch, pool.sequences) - len(self._active))
        used, admitted = sum(self._positions(r, pool) for r in self._active.values()), 0
        for request in queue[:places]:
            used += self._positions(request, pool)
            if used > pool.positions and (self._active or admitted):
                break
            admitted += 1
        return admitted

    def _positions(self, request: _Request, pool: KVPool) -> int:
        """The KV positions a request may come to hold in `pool`."""
        return min(pool.positions, request.seq.prompt_len + request.max_new_tokens + self._headroom)

    def _admit_or_refuse(self, request: _Request) -> None:
        """Raise Overloaded if a new request would wait behind more than the limits allow. Waiting means
        not being admitted at the next step: the queue's first `free` requests will be."""
        free = self._admissible(self._waiting)
        if free == len(self._waiting) and self._admissible(self._waiting + [request]) > free:
            return  # the new request joins the batch at the next step
        behind = self._waiting[free:]  # those that will still wait after the next admission
        prompt_tokens = request.seq.prompt_len
        if self.max_waiting is not None and len(behind) >= self.max_waiting:
            raise Overloaded(f"the server is busy: {len(behind)} requests are waiting (limit {self.max_waiting})",
                             "waiting_requests")
        waiting_tokens = sum(r.seq.prompt_len for r in behind)
        if self.max_waiting_tokens is not None and waiting_tokens + prompt_tokens > self.max_waiting_tokens:
            raise Overloaded(f"the server is busy: {waiting_tokens} prompt tokens are waiting, {prompt_tokens} more would "
                             f"pass the limit of {self.max_waiting_tokens}", "waiting_tokens")

    @property
    def num_waiting(self) -> int:
        """Requests queued that the next step will not admit."""
        return len(self._waiting) - self._admissible(self._waiting)

    def cancel(self, request_id: str, reason: str = "cancelled") -> GenerationResult | None:
        """Drop a request now and free its state on every worker; its result so far (None if it is
        unknown or already finished). Call it from the thread that steps, or between steps."""
        with self._queue_lock:
            waiting = next((r for r in self._waiting if r.request_id == request_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
        if waiting is not None:
            return self._result(waiting, reason)
        request = self._active.get(request_id)
        return self._finish(request, reason) if request is not None else None

    def _expire(self) -> dict[str, GenerationResult]:
        """Retire every request, waiting or running, whose deadline has passed."""
        now = time.monotonic()
        with self._queue_lock:
            expired = [r.request_id for r in self._waiting if r.deadline is not None and r.deadline <= now]
        expired += [i for i, r in self._active.items() if r.deadline is not None and r.deadline <= now]
        return {request_id: self.cancel(request_id, "timeout") for request_id in expired}

    @property
    def request_ids(self) -> list[str]:
        with self._queue_lock:
            return [r.request_id for r in self._waiting] + list(self._active)

    def step(self) -> StepReport:
        """Retire the expired, admit, plan, run one batched speculative step, learn, commit, retire."""
        # 1. retire requests past their deadline; admit queued requests between steps
        expired = self._expire()
        with self._queue_lock:
            admitted = self._waiting[: self._admissible(self._waiting)]
            del self._waiting[: len(admitted)]
            self._active.update((request.request_id, request) for request in admitted)
        if not self._active:
            return StepReport({}, expired)
        prefilling = self._prefill_chunks(list(self._active.values()))
        requests = [r for r in self._active.values() if r.request_id not in prefilling]
        if not requests:
            return StepReport({}, expired)
        t0 = time.perf_counter()
        while True:
            # 2. the batch's plan, and whether it tiers
            chain, top_lens, decision = self._plan(requests)
            self._calibrate(requests, chain)
            tiering, why = self._tiering(requests, chain)
            timings: list[TimingRecord] = []
            run = self._run_length(chain, requests, top_lens, tiering)
            try:
                # 3. one batched step: every sequence gets at least one target-verified (or tiered) token
                new = self._step(chain, requests, timings, top_lens, run, tiering)
                break
            except WorkerUnavailable as exc:
                self.engine.mark_down(exc, chain)  # a drafter: redo the step without it; the target: fail
                for r in requests:
                    r.ctx.drain_records()
                    r.ahead = None
        records = [r.ctx.drain_records() for r in requests]
        self._log_agreement(requests, records)
        if self.router is not None and not tiering:  # with the replays of the n-gram drafters this step's target did not verify
            records = [rs + self._shadow(chain, r.seq, tokens) for r, rs, tokens in zip(requests, records, new)]
        seconds = time.perf_counter() - t0
        if run:
            self._pass_s = seconds / max(1, *map(len, new))
        if self.router is not None:
            # 4. the router learns each request's verdicts and replays, and the step's level timings (of a
            # lossless step), and the time a token of the step's mode took where a request asked to tier
            if tiering:
                self.router.observe([r.route for r in requests], [[] for _ in requests])
            else:
                self.router.observe([r.route for r in requests], records, timings, seconds)
            lossy = self._lossy(requests)
            if why is not None and all(r.steps for r in requests):  # decoding: every prompt cached before this step
                self.router.tiering.observe(lossy[0].klass, len(requests), tiering, seconds, sum(map(len, new)))
            for request in lossy:
                if why is not None and request.tiering != tiering:
                    request.tiering_decisions.append({"tiered": tiering, "reason": why, "at_token": len(request.seq.generated)})
                request.tiering = tiering
        # 5. commit; retire what finished
        committed, finished = {}, expired
        for b, (request, tokens) in enumerate(zip(requests, new)):
            lens = tuple(chain.draft_lens[:-1]) + (top_lens[b],) if top_lens is not None else tuple(chain.draft_lens)
            end = next((i for i, t in enumerate(tokens) if t in request.ctx.eos_ids), None)
            tokens = tokens[: end + 1] if end is not None else tokens
            passes = len(tokens) if run else 1  # target passes: one a token in a run
            self._note_step(request, (tuple(chain.names), lens), decision if not tiering else None, len(requests), len(tokens),
                            seconds, passes)
            if request.ctx.tiered is not None and not tiering:  # a lossless step: the target's tokens
                request.ctx.tiers.add(TIER_TARGET, len(tokens))
            request.seq = request.seq.commit(tokens)
            request.steps += passes
            committed[request.request_id] = tokens
            if end is not None or request.budget <= 0:
                finished[request.request_id] = self._finish(request, "stop" if end is not None else "length")
        return StepReport(committed, finished, tuple(chain.names), tuple(chain.draft_lens), len(requests), seconds)

    def _prefill_chunks(self, requests: list[_Request]) -> set[str]:
        """Prefill this step's prompt chunks; return the ids of the requests not yet ready to decode.

        A prompt is prefilled in chunks [0, C), [C, 2C), ... (C = `prefill_chunk`), so where it is cut
        depends on the prompt alone, never on its batch-mates; its last chunk runs inside its first
        speculative step, as a short prompt does whole. A step takes chunks, in admission order, while
        they add up to at most C tokens (one at least), so a long prompt never stalls the requests
        already decoding for longer than one chunk's pass. Every model level of the static chain (those
        up) caches the chunks."""
        target = self.engine.levels[self.engine.target_name]
        budget, chunks, waiting = self.prefill_chunk, [], set()
        for request in requests:
            if request.steps:  # decoding: its prompt is cached
                continue
            n = len(request.seq.token_ids)
            cached = n - target.backlog(request.seq.seq_id, n)
            end = (cached // self.prefill_chunk + 1) * self.prefill_chunk  # this chunk's end
            size = min(end, n) - cached
            if size > budget:
                waiting.add(request.request_id)
            elif end < n:
                budget -= size
                chunks.append((request.seq, list(request.seq.token_ids[:end])))
                waiting.add(request.request_id)
            else:  # its last chunk: prefilled by its first step
                budget -= size
        if not chunks:
            return waiting
        chain = self.engine.live_chain(self.engine.chain)
        for level in chain.levels:
            try:
                level.prefill(chunks)
            except WorkerUnavailable as exc:
                self.engine.mark_down(exc, chain)  # a drafter: it catches up when it drafts again; the target: fail
        return waiting

    def _plan(self, requests: list[_Request]) -> tuple[Chain, list[int] | None, Decision | None]:
        """The chain for the batch (without drafters that are down), each sequence's draft length at
        its top (None: the chain's) and the router's decision (None: the static chain)."""
        if self.router is None:
            return self.engine.live_chain(self.engine.chain), None, None
        backlog = {name: sum(level.backlog(r.seq.seq_id, len(r.seq.token_ids)) for r in requests)
                   for name, level in self.engine.levels.items() if name != self.engine.target_name}
        remaining = sum(r.budget for r in requests) / len(requests)
        decision = self.router.plan([r.route for r in requests], backlog, remaining)
        chain = self.engine.live_chain(self.engine.chain_for(decision.plan))
        if len(chain.levels) < 2 or tuple(chain.names) != decision.plan.chain:
            return chain, None, decision  # a drafter is down: its shorter chain's own lengths
        return chain, list(decision.top_lens), decision

    def _calibrate(self, requests: list[_Request], chain: Chain) -> None:
        """The thresholds of each request tiered by a quality budget, for this step's drafter below the
        target: calibrated on the agreement measured for its class (lossless where nothing drafts)."""
        drafter = chain.names[-2] if len(chain.levels) > 1 else None
        for r in requests:
            if r.quality_budget is not None:
                r.ctx.tiered = (self.agreement.thresholds(r.klass, drafter, r.quality_budget) if drafter is not None
                                else Thresholds(1.0, 1.0))

    def _log_agreement(self, requests: list[_Request], records: list[list]) -> None:
        """Each greedy request's drafted tokens the target checked this step, with their drafter's
        confidence and whether the target agreed, into `agreement` under the request's class."""
        target = self.engine.target_name
        for r, request_records in zip(requests, records):
            if r.ctx.params.greedy:
                for rec in request_records:
                    if isinstance(rec, VerifyRecord) and rec.verifier == target and rec.agreed is not None:
                        self.agreement.observe(r.klass, rec.drafter, rec.confidence, rec.agreed)

    @staticmethod
    def _lossy(requests: list[_Request]) -> list[_Request]:
        """The requests in a lossy tiered mode (a threshold below 1)."""
        return [r for r in requests if r.ctx.tiered is not None and not r.ctx.tiered.lossless]

    def _tiering(self, requests: list[_Request], chain: Chain) -> tuple[bool, str | None]:
        """Whether this step on `chain` is a tiered one (some request asked for a lossy tiered mode), and
        why where the router chose (None: it did not). With a router, a batch holding such a request
        tiers where the router's plan drafts, while the router's `tiering` measures that faster than
        lossless steps for the batch (led by the first such request's class)."""
        lossy = self._lossy(requests)
        if not lossy:  # tau_low = 1 is lossless: a plain step, its tokens tier 3
            return False, None
        if self.router is None:
            return True, None
        if len(chain.levels) < 2:  # the router decodes with the target alone: nothing drafted to tier
            return False, None
        return self.router.tiering.choose(lossy[0].klass, len(requests))

    def _run_length(self, chain: Chain, requests: list[_Request], top_lens: list[int] | None, tiering: bool) -> int:
        """The tokens this step decodes per sequence in one call to the target: 0 unless the step is plain
        decoding (no sequence drafts, every prompt is cached, not tiered nor pipelined), else as many
        as fit in `decode_run_s` at the last plain step's pace (1 until one was timed)."""
        if self._pool is not None or tiering:
            return 0
        seqs, target = [r.seq for r in requests], chain.levels[-1]
        if any(target.backlog(s.seq_id, len(s.token_ids)) > 1 for s in seqs):
            return 0
        if any(top_block_lens(chain, seqs, [r.budget for r in requests], top_lens)):
            return 0
        if self._pass_s is None:
            return 1
        return max(1, min(MAX_RUN, int(self.decode_run_s / self._pass_s)))

    def _step(self, chain: Chain, requests: list[_Request], timings: list[TimingRecord], top_lens: list[int] | None,
              run: int, tiering: bool) -> list[list[int]]:
        seqs, ctxs, budgets = [r.seq for r in requests], [r.ctx for r in requests], [r.budget for r in requests]
        if run > 1:
            return decode_run(chain.levels[-1], seqs, ctxs, budgets, run, timings)
        if tiering:  # tiered requests in the batch: one tiered step for all
            for request in requests:
                request.ahead = None
            return tiered_step(chain, seqs, ctxs, budgets, timings, top_lens)
        if self._pool is None:
            return speculative_step(chain, seqs, ctxs, budgets, timings, top_lens)
        new, aheads = pipelined_step(chain, seqs, ctxs, budgets, timings, [r.ahead for r in requests], self._pool, top_lens)
        for request, ahead in zip(requests, aheads):
            request.ahead = ahead
        return new

    def _shadow(self, chain: Chain, seq: SequenceState, new: list[int]) -> list:
        """Records of the prompt-lookup drafters this step's target did not verify (out of its chain,
        or under a middle level), replayed on the tokens it committed after `seq`
        (specrouter/core/shadow.py): a routed request measures them against the target on every step."""
        verified = chain.names[-2] if len(chain.names) > 1 else None  # the level the target verified
        return [r for level in self.engine.levels.values() if isinstance(level, NgramLevel) and level.name != verified
                for r in shadow_records(level, seq, new, self.engine.target_name, SHADOW_BLOCK)]

    def _note_step(self, request: _Request, plan: tuple[tuple[str, ...], tuple[int, ...]], decision: Decision | None,
                   batch: int, committed: int, seconds: float, passes: int = 1) -> None:
        """Record a step in the request's routing explanation: the plan it ran (`passes`: the target's
        passes it made), a decision where its chain changed (or a level was explored), and the
        predicted and measured time."""
        request.chains[plan] += passes
        last = request.decisions[-1] if request.decisions else None
        reason = decision.reason if decision is not None else "tiered step" if request.tiering else "static chain"
        if last is None or (last["chain"] != list(plan[0]) and reason != "keep") or reason.startswith("explore"):
            request.decisions.append({"chain": list(plan[0]), "draft_lens": list(plan[1]), "batch": batch, "reason": reason,
                                      **({"predicted_s_per_token": round(decision.plan.predicted_s_per_token, 5),
                                          "runner_up": decision.runner_up.as_dict() if decision.runner_up else None}
                                         if decision is not None else {}),
                                      "at_token": len(request.seq.generated)})
        if request.first_step_s is None:
            request.first_step_s = seconds
        elif decision is not None:
            request.predicted_s += decision.plan.predicted_s_per_token * committed
            request.measured_s += seconds
            request.decode_tokens += committed

    def run(self, requests: list[dict]) -> list[GenerationResult]:
        """Submit every request (keyword arguments of `submit`) and step until all are done. If a step
        fails (the target is down), every request is retired, its state freed, and the error raised."""
        ids = [self.submit(**request) for request in requests]
        results: dict[str, GenerationResult] = {}
        try:
            while self.has_work:
                results.update(self.step().finished)
        except BaseException:
            for request_id in self.request_ids:
                self.cancel(request_id)
            raise
        return [results[i] for i in ids]

    def stream(self, request_id: str) -> Generator[list[int], bool | None, GenerationResult]:
        """Step the loop until a request finishes (the caller steps it: a loop of its own), yielding the
        tokens each step commits for it (target-verified, the end token included), and return its
        GenerationResult. `send(True)` ends it after the last yielded block with finish_reason "stop"
        (a stop string matched); closing it early (the client went away), or a failed step, cancels
        it and frees its state on every worker."""
        result = None
        try:
            while result is None:
                report = self.step()
                tokens, result = report.committed.get(request_id), report.finished.get(request_id)
                if tokens and (yield tokens):
                    result = replace(result or self.cancel(request_id, "stop"), finish_reason="stop")
            return result
        finally:
            if result is None:
                self.cancel(request_id)

    def _finish(self, request: _Request, reason: str) -> GenerationResult:
        del self._active[request.request_id]
        self._release(request)
        return self._result(request, reason)

    def _result(self, request: _Request, reason: str) -> GenerationResult:
        (names, lens), _ = request.chains.most_common(1)[0] if request.chains else ((tuple(self.engine.chain.names), ()), 0)
        return GenerationResult(
            token_ids=list(request.seq.generated),
            finish_reason=reason,
            elapsed_s=time.perf_counter() - request.t0,
            num_steps=request.steps,
            chain=list(names),
            draft_lens=list(lens),
            level_stats=[s for s in request.ctx.stats.values() if s.time_s > 0 or s.num_draft_tokens],
            prompt_tokens=request.seq.prompt_len,
            routing=request.routing(),
            tiered=request.ctx.tiered, quality_budget=request.quality_budget,
            tiers=request.ctx.tiers if request.ctx.tiered is not None else None,
        )

    def _release(self, request: _Request) -> None:
        for level in self.engine.all_levels:
            level.release(request.seq.seq_id)
