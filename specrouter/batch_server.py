"""A BatchLoop on a thread of its own, serving many concurrent callers.

`steps()` speaks Engine.steps' protocol for one request (yield each step's committed tokens, return
the GenerationResult, `send(True)` ends it after the last yielded block, `close()` cancels it), so
the Frontend, and through it every serving face, runs its requests in the shared batch unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator
from dataclasses import replace

from specrouter.batching import BatchLoop
from specrouter.engine import GenerationResult, run_to_end
from specrouter.sampling import SamplingParams


class BatchServer:
    def __init__(self, loop: BatchLoop):
        self.loop = loop
        self._cond = threading.Condition()  # guards the loop: a step, a submit or a cancel at a time
        self._inboxes: dict[str, queue.SimpleQueue] = {}  # request id -> ("tokens" | "done" | "error", value)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="specrouter-batch", daemon=True)
        self._thread.start()

    def steps(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int = 0,
              ignore_eos: bool = False, route=None) -> Generator[list[int], bool | None, GenerationResult]:
        """One request in the batch (its class from `route`, if given; the batch's plan is chosen by the loop)."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._cond:
            request_id = self.loop.submit(prompt_ids, max_new_tokens, params, seed, ignore_eos, getattr(route, "klass", "default"))
            self._inboxes[request_id] = inbox
            self._cond.notify()
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
                 ignore_eos: bool = False, route=None) -> GenerationResult:
        return run_to_end(self.steps(prompt_ids, max_new_tokens, params, seed, ignore_eos, route))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _cancel(self, request_id: str, reason: str) -> GenerationResult | None:
        with self._cond:
            self._inboxes.pop(request_id, None)
            return self.loop.cancel(request_id, reason)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.loop.has_work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                try:
                    report = self.loop.step()
                except Exception as exc:  # e.g. the target is down: every request in the batch fails with it
                    for request_id in self.loop.request_ids:
                        self._inboxes.pop(request_id).put(("error", exc))
                        self.loop.cancel(request_id)
                    continue
                for request_id, tokens in report.committed.items():
                    self._inboxes[request_id].put(("tokens", tokens))
                for request_id, result in report.finished.items():
                    self._inboxes.pop(request_id).put(("done", result))


def _until_done(inbox: queue.SimpleQueue) -> GenerationResult:
    """The result of a request that finished while its caller was still reading its tokens."""
    while True:
        kind, value = inbox.get()
        if kind == "done":
            return value
