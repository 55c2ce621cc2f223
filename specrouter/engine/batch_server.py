"""A BatchLoop on a thread of its own, serving many concurrent callers.

`steps()` speaks BatchLoop.stream's protocol for one request (yield each step's committed tokens,
return the GenerationResult, `send(True)` ends it after the last yielded block, `close()` cancels
it), so the Frontend, and through it every serving face, runs its requests in the shared batch.
A request is queued when `steps()` is called, not when its generator first runs, so a full queue
(Overloaded) or bad input fails the call itself, while a step may be running: callers never wait on
a step to learn they are refused.
"""

from __future__ import annotations

import inspect
import queue
import threading
import uuid
from collections.abc import Generator
from dataclasses import replace

from specrouter.core.sampling import SamplingParams
from specrouter.core.tiers import QualityBudget, Thresholds
from specrouter.engine.loop import BatchLoop, GenerationResult


class BatchServer:
    def __init__(self, loop: BatchLoop):
        self.loop = loop
        self._lock = threading.Lock()  # a step or a cancel at a time (submit takes only the loop's queue lock)
        self._wake = threading.Event()  # set by submit: the loop has work again
        self._inboxes: dict[str, queue.SimpleQueue] = {}  # request id -> ("tokens" | "done" | "error", value)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="specrouter-batch", daemon=True)
        self._thread.start()

    def steps(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int = 0,
              ignore_eos: bool = False, klass: str = "default", timeout_s: float | None = None,
              tiered: Thresholds | QualityBudget | None = None) -> Generator[list[int], bool | None, GenerationResult]:
        """Queue one request of prompt class `klass` (`tiered`: in tiered verification mode) in the batch
        now and return its steps; raises Overloaded or ValueError, queueing nothing."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        request_id = uuid.uuid4().hex
        self._inboxes[request_id] = inbox  # before submit: the loop may commit its first tokens at once
        try:
            self.loop.submit(prompt_ids, max_new_tokens, params, seed, ignore_eos, klass, timeout_s, request_id, tiered)
        except BaseException:
            self._inboxes.pop(request_id, None)
            raise
        self._wake.set()
        return _Steps(self._follow(request_id, inbox), lambda: self._cancel(request_id, "cancelled"))

    def _follow(self, request_id: str, inbox: queue.SimpleQueue) -> Generator[list[int], bool | None, GenerationResult]:
        result, yielded = None, 0
        try:
            while True:
                kind, value = inbox.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    result = value
                    return result
                yielded += len(value)
                if (yield value):  # a stop string matched: end after what the caller has
                    result = self._cancel(request_id, "stop") or _until_done(inbox)
                    result = replace(result, token_ids=result.token_ids[:yielded], finish_reason="stop")
                    return result
        finally:
            if result is None:  # closed early or failed: free the sequence now
                self._cancel(request_id, "cancelled")

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int = 0,
                 ignore_eos: bool = False, klass: str = "default", timeout_s: float | None = None) -> GenerationResult:
        steps = self.steps(prompt_ids, max_new_tokens, params, seed, ignore_eos, klass, timeout_s)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()

    def _cancel(self, request_id: str, reason: str) -> GenerationResult | None:
        with self._lock:
            self._inboxes.pop(request_id, None)
            return self.loop.cancel(request_id, reason)

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking for work: a submit after this wakes the wait below
            if not self.loop.has_work and not self._closed:
                self._wake.wait()
                continue
            if self._closed:
                return
            with self._lock:
                try:
                    report = self.loop.step()
                except Exception as exc:  # e.g. the target is down: every request in the batch fails with it
                    for request_id in self.loop.request_ids:
                        inbox = self._inboxes.pop(request_id, None)
                        if inbox is not None:
                            inbox.put(("error", exc))
                        self.loop.cancel(request_id)
                    continue
                for request_id, tokens in report.committed.items():
                    self._inboxes[request_id].put(("tokens", tokens))
                for request_id, result in report.finished.items():
                    inbox = self._inboxes.pop(request_id, None)
                    if inbox is not None:  # None: cancelled meanwhile by its caller
                        inbox.put(("done", result))


class _Steps(Generator):
    """A request's steps; closing them before the first step was read also cancels the request (a
    generator closed before it started runs none of its code)."""

    def __init__(self, steps: Generator, cancel):
        self._steps, self._cancel_queued = steps, cancel

    def send(self, value):
        return self._steps.send(value)

    def throw(self, *args):
        return self._steps.throw(*args)

    def close(self) -> None:
        if inspect.getgeneratorstate(self._steps) == inspect.GEN_CREATED:
            self._cancel_queued()
        self._steps.close()


def _until_done(inbox: queue.SimpleQueue) -> GenerationResult:
    """The result of a request that finished while its caller was still reading its tokens."""
    while True:
        kind, value = inbox.get()
        if kind == "done":
            return value
