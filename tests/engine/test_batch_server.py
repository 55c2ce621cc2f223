"""Requests served concurrently through the Frontend run in one shared batch (BatchServer)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from specrouter.engine.batch_server import BatchServer
from specrouter.engine.loop import BatchLoop
from specrouter.engine.engine import Engine
from specrouter.engine.frontend import Frontend
from specrouter.engine.request import GenerationRequest

PROMPTS = ["Once upon", "def fib(n):", "The three primary colors are", "import os\n", "SELECT * FROM", "Hello"]


@pytest.fixture(scope="module")
def served(tiny_dirs):
    engine = Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3])
    loop = BatchLoop(engine)
    server = BatchServer(loop)
    steps_seen = []
    step = loop.step
    loop.step = lambda: steps_seen.append(len(loop.request_ids)) or step()  # batch size at every step
    yield Frontend(engine, batcher=server), steps_seen
    server.close()


def run_to_end(steps):
    """Drive a request's steps (BatchServer.steps) to their end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value

def test_concurrent_streams_batch_together_and_equal_each_alone(served):
    frontend, steps_seen = served
    requests = [GenerationRequest(prompt=p, max_tokens=12 + i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    alone = [frontend.engine.generate(frontend.prompt_ids(r), r.max_tokens, ignore_eos=True).token_ids for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        outs = list(pool.map(lambda r: list(frontend.stream(r)), requests))
    for items, want, request in zip(outs, alone, requests):
        assert [t for item in items if "token_ids" in item for t in item["token_ids"]] == want
        assert (items[-1]["finish_reason"], items[-1]["completion_tokens"]) == ("length", request.max_tokens)
    assert max(steps_seen) > 1  # requests shared steps


def test_stop_string_and_an_abandoned_stream_free_their_state(served):
    frontend, _ = served
    full = frontend.generate(GenerationRequest(prompt="Once upon", max_tokens=40, ignore_eos=True))
    stop = full["text"][10:14]
    out = frontend.generate(GenerationRequest(prompt="Once upon", max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert out["text"] == full["text"][: full["text"].index(stop)] and out["finish_reason"] == "stop"
    assert out["completion_tokens"] < 40
    stream = frontend.stream(GenerationRequest(prompt="def fib(n):", max_tokens=200, ignore_eos=True))
    next(stream), next(stream)  # accepted, first text
    stream.close()  # the client went away
    workers = [level.worker for level in frontend.engine.levels.values()]
    assert [w.num_sequences() for w in workers] == [0, 0]


def test_a_full_queue_refuses_at_once_while_a_step_runs_and_the_admitted_finish(tiny_dirs):
    import threading
    import time

    from specrouter.engine.request import Overloaded

    engine = Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3])
    loop = BatchLoop(engine, max_batch=1, max_waiting=1)
    stepping, step = threading.Event(), loop.step
    loop.step = lambda: stepping.set() or time.sleep(0.5) or step()  # every step takes at least 0.5 s
    server = BatchServer(loop)
    try:
        ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
        first = server.steps(ids[0], 3, ignore_eos=True)
        assert stepping.wait(10)
        second = server.steps(ids[1], 3, ignore_eos=True)  # waits behind the first
        t0 = time.perf_counter()
        with pytest.raises(Overloaded):
            server.steps(ids[2], 3, ignore_eos=True)
        assert time.perf_counter() - t0 < 0.25  # not after the step
        assert run_to_end(first).token_ids == engine.generate(ids[0], 3, ignore_eos=True).token_ids
        assert run_to_end(second).token_ids == engine.generate(ids[1], 3, ignore_eos=True).token_ids

    finally:
        server.close()


def test_a_stream_closed_as_soon_as_it_is_accepted_frees_its_state(served):
    frontend, _ = served
    stream = frontend.stream(GenerationRequest(prompt="def fib(n):", max_tokens=200, ignore_eos=True))
    assert "prompt_tokens" in next(stream)  # queued in the batch
    stream.close()  # the client went away before any text
    workers = [level.worker for level in frontend.engine.levels.values()]
    assert frontend.batcher.loop.request_ids == [] and [w.num_sequences() for w in workers] == [0, 0]
