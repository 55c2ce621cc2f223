"""Continuous batching: many requests advance together, one speculative step per `step()`.

The loop holds the active requests and a queue. Every step it (1) admits queued requests up to
`max_batch` (their prompts prefill inside the step's batched passes), (2) picks the chain and draft
lengths for the batch, (3) runs one batched speculative step (chain.speculative_step: batched
drafting and batched verification per level, per-sequence verdicts and rollback), (4) commits each
request's tokens and retires the finished ones, releasing their state on every worker. A cancelled
request is retired at once; the others never notice (their caches and versions are their own).

With an AdaptiveRouter the plan is the one with the best goodput for the current batch (committed
tokens per second for the whole batch, specrouter/routing/router.py `plan_for_batch`), so speculation
shrinks and switches off as the batch grows and returns as it shrinks; without one, every step
runs the engine's static chain (fixed draft lengths; a one-level chain is plain batched decoding).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specrouter.routing.acceptance import OwnAcceptance
from specrouter.core.chain import Chain, StepContext, drafted, speculative_step
from specrouter.engine.engine import Engine, GenerationResult
from specrouter.core.levels import ProposeItem, ScoreItem
from specrouter.core.pipeline import DraftAhead, pipelined_step
from specrouter.core.records import TimingRecord
from specrouter.engine.request import Overloaded
from specrouter.routing.router import taught
from specrouter.core.sampling import SamplingParams
from specrouter.routing.scheduler import Plan
from specrouter.core.sequence import SequenceState
from specrouter.core.tiered import tiered_step
from specrouter.core.tiers import Thresholds
from specrouter.core.worker import WorkerUnavailable


@dataclass
class _Request:
    request_id: str
    seq: SequenceState
    ctx: StepContext
    max_new_tokens: int
    klass: str
    deadline: float | None = None  # time.monotonic() past which the request is retired ("timeout")
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    chains: Counter = field(default_factory=Counter)  # (chain, draft_lens) -> steps
    decisions: list[dict] = field(default_factory=list)  # every change of plan, with the batch size it was made for
    acceptance: OwnAcceptance = field(default_factory=OwnAcceptance)  # its own rounds and blocks (AdaptiveRouter.teach)
    ahead: DraftAhead | None = None  # with pipelining: the block drafted while the last step verified

    @property
    def budget(self) -> int:
        return self.max_new_tokens - len(self.seq.generated)


@dataclass(frozen=True)
class StepReport:
    committed: dict[str, list[int]]  # request id -> tokens committed this step (end token included)
    finished: dict[str, GenerationResult]  # requests that finished this step
    chain: tuple[str, ...] = ()
    draft_lens: tuple[int, ...] = ()
    batch: int = 0
    seconds: float = 0.0


class BatchLoop:
    def __init__(self, engine: Engine, router=None, max_batch: int = 64, pipeline: bool = False,
                 max_waiting: int | None = None, max_waiting_tokens: int | None = None):
        """`router`: an AdaptiveRouter choosing each step's plan by goodput; None: the static chain.
        `pipeline`: draft each next block while the target verifies (specrouter/core/pipeline.py).
        `max_waiting` / `max_waiting_tokens`: the most requests / prompt tokens that may wait for a
        place in the batch (None: no limit); `submit` refuses what would go past them."""
        self.engine, self.router, self.max_batch = engine, router, max_batch
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
               request_id: str | None = None, tiered: Thresholds | None = None) -> str:
        """Queue a request (it joins the batch at the next step); returns its id. Raises Overloaded,
        queueing nothing, if it would wait past `max_waiting` / `max_waiting_tokens`. `tiered`: the
        opt-in lossy tiered verification mode (specrouter/core/tiered.py); None: lossless."""
        self.engine.check_request(len(prompt_ids), max_new_tokens)
        request_id = request_id or uuid.uuid4().hex
        ctx = StepContext(params, torch.Generator().manual_seed(seed), frozenset() if ignore_eos else self.engine.eos_ids,
                          self.engine.new_stats(), tiered=tiered)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        request = _Request(request_id, SequenceState.new(request_id, list(prompt_ids)), ctx, max_new_tokens, klass, deadline)
        with self._queue_lock:
            self._admit_or_refuse(len(prompt_ids))
            self._waiting.append(request)
        return request_id

    def _admit_or_refuse(self, prompt_tokens: int) -> None:
        """Raise Overloaded if a new request would wait behind more than the limits allow. Waiting means
        finding no place at the next step: the queue's first `free` requests will have one."""
        free = max(0, self.max_batch - len(self._active))
        behind = self._waiting[free:]  # those that will still wait after the next admission
        if len(self._waiting) < free:
            return  # the new request joins the batch at the next step
        if self.max_waiting is not None and len(behind) >= self.max_waiting:
            raise Overloaded(f"the server is busy: {len(behind)} requests are waiting (limit {self.max_waiting})",
                             "waiting_requests")
        waiting_tokens = sum(r.seq.prompt_len for r in behind)
        if self.max_waiting_tokens is not None and waiting_tokens + prompt_tokens > self.max_waiting_tokens:
            raise Overloaded(f"the server is busy: {waiting_tokens} prompt tokens are waiting, {prompt_tokens} more would "
                             f"pass the limit of {self.max_waiting_tokens}", "waiting_tokens")

    @property
    def num_waiting(self) -> int:
        """Requests queued that will not find a place in the batch at the next step."""
        return max(0, len(self._waiting) - max(0, self.max_batch - len(self._active)))

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
        """Retire the expired, admit, plan, run one batched speculative step, commit, retire."""
        # 1. retire requests past their deadline; admit queued requests between steps
        expired = self._expire()
        with self._queue_lock:
            while self._waiting and len(self._active) < self.max_batch:
                request = self._waiting.pop(0)
                self._active[request.request_id] = request
        if not self._active:
            return StepReport({}, expired)
        requests = list(self._active.values())
        t0 = time.perf_counter()
        while True:
            # 2. the batch's plan
            chain, top_lens = self._plan(requests)
            timings: list[TimingRecord] = []
            try:
                # 3. one batched step: every sequence gets at least one target-verified token
                new = self._step(chain, requests, timings, top_lens)
                break
            except WorkerUnavailable as exc:
                self.engine._mark_down(exc, chain)  # a drafter: redo the step without it; the target: fail
                for r in requests:
                    r.ctx.drain_records()
                    r.ahead = None
        seconds = time.perf_counter() - t0
        if self.router is not None:
            records = [taught(r.ctx.drain_records(), first_step=r.steps == 0) for r in requests]
            for request, request_records in zip(requests, records):
                self.router.teach(request.acceptance, request_records)
            self.router.observe_batch([(r.klass, rs) for r, rs in zip(requests, records)], timings)
        # 4. commit; retire what finished
        committed, finished = {}, expired
        for b, (request, tokens) in enumerate(zip(requests, new)):
            lens = tuple(chain.draft_lens[:-1]) + (top_lens[b],) if top_lens is not None else tuple(chain.draft_lens)
            plan = (tuple(chain.names), lens)
            request.ctx.drain_records()
            end = next((i for i, t in enumerate(tokens) if t in request.ctx.eos_ids), None)
            tokens = tokens[: end + 1] if end is not None else tokens
            self._note_plan(request, plan, len(requests))
            request.seq = request.seq.commit(tokens)
            request.steps += 1
            committed[request.request_id] = tokens
            if end is not None or request.budget <= 0:
                finished[request.request_id] = self._finish(request, "stop" if end is not None else "length")
        return StepReport(committed, finished, tuple(chain.names), tuple(chain.draft_lens), len(requests), seconds)

    def _step(self, chain: Chain, requests: list[_Request], timings: list[TimingRecord], top_lens: list[int] | None) -> list[list[int]]:
        seqs, ctxs, budgets = [r.seq for r in requests], [r.ctx for r in requests], [r.budget for r in requests]
        if any(ctx.tiered is not None for ctx in ctxs):  # tiered requests in the batch: one tiered step for all
            for request in requests:
                request.ahead = None
            return tiered_step(chain, seqs, ctxs, budgets, timings, top_lens)
        if self._pool is None:
            return speculative_step(chain, seqs, ctxs, budgets, timings, top_lens)
        new, aheads = pipelined_step(chain, seqs, ctxs, budgets, timings, [r.ahead for r in requests], self._pool, top_lens)
        for request, ahead in zip(requests, aheads):
            request.ahead = ahead
        return new

    def _note_plan(self, request: _Request, plan: tuple[tuple[str, ...], tuple[int, ...]], batch: int) -> None:
        request.chains[plan] += 1
        last = request.decisions[-1] if request.decisions else None
        if last is None or (tuple(last["chain"]), tuple(last["draft_lens"])) != plan:
            request.decisions.append({"chain": list(plan[0]), "draft_lens": list(plan[1]), "batch": batch,
                                      "reason": "best goodput for the batch" if self.router is not None else "static chain",
                                      "at_token": len(request.seq.generated)})

    def run(self, requests: list[dict]) -> list[GenerationResult]:
        """Submit every request (keyword arguments of `submit`) and step until all are done."""
        ids = [self.submit(**request) for request in requests]
        results: dict[str, GenerationResult] = {}
        while self.has_work:
            results.update(self.step().finished)
        return [results[i] for i in ids]

    def _plan(self, requests: list[_Request]) -> tuple[Chain, list[int] | None]:
        """The chain for the batch and each sequence's draft length at its top (None: the chain's)."""
        if self.router is None:
            return self.engine._live(self.engine.chain), None
        classes = [r.klass for r in requests]
        backlog = {name: sum(level.backlog(r.seq.seq_id, len(r.seq.token_ids)) for r in requests)
                   for name, level in self.engine.levels.items() if name != self.engine.target_name}
        remaining = sum(r.budget for r in requests) / len(requests)
        chain = self.engine._live(self.engine.chain_for(self.router.plan_for_batch(classes, backlog, remaining)))
        if len(chain.levels) < 2:
            return chain, None
        drafter, verifier = chain.names[-2], chain.names[-1]
        fallback = [self.router.acceptance.alpha(k, drafter, verifier) for k in classes]
        alphas = [r.acceptance.alpha(drafter, verifier, f) for r, f in zip(requests, fallback)]
        plan = Plan(tuple(chain.names), tuple(chain.draft_lens), 0.0)
        return chain, self.router.sequence_draft_lens(plan, classes, alphas, [r.acceptance for r in requests])

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
            routing={"class": request.klass, "decisions": request.decisions,
                     "steps_by_plan": [{"chain": list(c), "draft_lens": list(g), "steps": n} for (c, g), n in request.chains.most_common()]},
            tiered=request.ctx.tiered,
            tiers=request.ctx.tiers if request.ctx.tiered is not None else None,
        )

    def _release(self, request: _Request) -> None:
        for level in self.engine.all_levels:
            level.release(request.seq.seq_id)


def calibration_passes(level, batch: int, lengths: tuple[int, ...], context: int) -> list[tuple[str, int, float]]:
    """Time a level's batched passes over `batch` throwaway sequences: ("score", block length, s) per
    length (verifiers only) and ("draft", n, s) for up to four tokens drafted for all of them (n: the
    most any of them drafted, at least 1)."""
    params, out = SamplingParams(), []
    seqs = [SequenceState.new(f"calibrate-{level.name}-{batch}-{b}", list(range(1 + b, context + 1 + b))) for b in range(batch)]
    ctxs = [list(seq.token_ids) for seq in seqs]
    try:
        if level.can_verify:
            level.score([ScoreItem(seq, ctx[:-1], [], params) for seq, ctx in zip(seqs, ctxs)])  # prefill, not timed
            for n in lengths:
                t0 = time.perf_counter()
                level.score([ScoreItem(seq, ctx, list(range(2, n + 1)), params) for seq, ctx in zip(seqs, ctxs)])
                out.append(("score", n, time.perf_counter() - t0))
        t0 = time.perf_counter()
        blocks = level.propose([ProposeItem(seq, ctx, 4, params, 0) for seq, ctx in zip(seqs, ctxs)])
        out.append(("draft", max(1, *(drafted(b, 4) for b in blocks)), time.perf_counter() - t0))  # one that stops unsure drafts fewer
    finally:
        for seq in seqs:
            level.release(seq.seq_id)
    return out
