"""Continuous batching: batched outputs equal one-at-a-time outputs; cancellation frees only its own state."""

import pytest

from specrouter.engine.loop import BatchLoop
from specrouter.engine.engine import Engine
from specrouter.engine.calibration import calibrate_costs, router_for
from specrouter.routing.router import Decision
from specrouter.routing.scheduler import Plan

from conftest import chain_spec, prompts, synthetic_batch_profile


@pytest.mark.parametrize("chain, draft_lens", [("draft,target", [3]), ("ngram,target", [4]), ("ngram,draft,target", [2, 3]),
                                               ("target", None)])
def test_16_concurrent_greedy_requests_equal_one_at_a_time(tiny_dirs, chain, draft_lens):
    engine = Engine(chain_spec(tiny_dirs, chain), dtype="float32", draft_lens=draft_lens)
    requests = [{"prompt_ids": p, "max_new_tokens": 6 + 3 * (i % 5), "ignore_eos": True} for i, p in enumerate(prompts(16, 2000))]
    alone = [engine.generate(r["prompt_ids"], r["max_new_tokens"], ignore_eos=True).token_ids for r in requests]
    loop = BatchLoop(engine)
    # 12 start together, 4 join after the first step while the others run (continuous batching)
    ids = [loop.submit(**r) for r in requests[:12]]
    results, batches = {}, []
    for step in range(1000):
        if step == 1:
            ids += [loop.submit(**r) for r in requests[12:]]
        if not loop.has_work:
            break
        report = loop.step()
        batches.append(report.batch)
        results.update(report.finished)
    assert [results[i].token_ids for i in ids] == alone
    assert max(batches) == 16 and all(len(results[i].token_ids) == r["max_new_tokens"] for i, r in zip(ids, requests))
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values() if hasattr(level, "worker"))


def test_cancelled_request_frees_its_state_and_others_are_unchanged(tiny_dirs):
    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    requests = [{"prompt_ids": p, "max_new_tokens": 20, "ignore_eos": True} for p in prompts(6, 2000, seed=1)]
    alone = [engine.generate(**r).token_ids for r in requests]
    loop = BatchLoop(engine)
    ids = [loop.submit(**r) for r in requests]
    results = {}
    for _ in range(2):
        results.update(loop.step().finished)
    workers = [level.worker for level in engine.levels.values()]
    assert [w.num_sequences() for w in workers] == [6, 6]
    assert loop.cancel(ids[2])
    assert [w.num_sequences() for w in workers] == [5, 5] and loop.num_active == 5
    assert not loop.cancel(ids[2])
    while loop.has_work:
        results.update(loop.step().finished)
    assert ids[2] not in results
    assert [results[i].token_ids for j, i in enumerate(ids) if j != 2] == [a for j, a in enumerate(alone) if j != 2]
    assert [w.num_sequences() for w in workers] == [0, 0]


def test_end_token_finishes_one_request_and_not_the_others(tiny_dirs):
    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    p = prompts(4, 2000, seed=2)
    free = engine.generate(p[0], 12, ignore_eos=True).token_ids
    engine.eos_ids = frozenset({free[4]})  # request 0 meets an "end token" at its 5th token
    requests = [{"prompt_ids": q, "max_new_tokens": 12, "ignore_eos": i > 0} for i, q in enumerate(p)]
    alone = [engine.generate(**r) for r in requests]
    batched = BatchLoop(engine).run(requests)
    assert batched[0].finish_reason == "stop" and batched[0].token_ids == free[: free.index(free[4]) + 1]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.finish_reason for b in batched] == [a.finish_reason for a in alone]


def test_goodput_loop_is_lossless_and_speculates_again_as_the_batch_shrinks(tiny_dirs):
    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    draft, target = list(engine.levels)
    calibrated = router_for(engine, calibrate=False)
    calibrate_costs(calibrated, engine.levels, batches=(1, 2), lengths=(1, 2))  # real batched passes
    assert all(calibrated.profiler.score_time(name, 2, batch=2) > 0 for name in (draft, target))
    assert calibrated.profiler.draft_time(draft, batch=2) > 0
    router = router_for(engine, calibrate=False)
    synthetic_batch_profile(router, target, draft)  # a profile where big batches don't pay
    router.observe = lambda requests, records, timings, seconds: None  # keep it fixed while the loop runs
    requests = [{"prompt_ids": p, "max_new_tokens": 2 + 10 * (i == 0), "ignore_eos": True} for i, p in enumerate(prompts(16, 2000, 3))]
    alone = [engine.generate(**r).token_ids for r in requests]
    loop = BatchLoop(engine, router)
    ids = [loop.submit(**r) for r in requests]
    results, plans = {}, []
    while loop.has_work:
        report = loop.step()
        plans.append((report.batch, report.chain))
        results.update(report.finished)
    assert [results[i].token_ids for i in ids] == alone
    assert plans[0] == (16, (target,))  # 16 at once: plain batched decoding
    assert plans[-1] == (1, (draft, target))  # the long request alone: speculation is back
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values())


def test_sequences_drafting_different_lengths_in_one_batch_equal_one_at_a_time(tiny_dirs):
    engine = Engine(chain_spec(tiny_dirs, "ngram,draft,target"), dtype="float32", draft_lens=[2, 4])
    router = router_for(engine, calibrate=False)
    router.plan = lambda requests, backlog=None, remaining=0.0: Decision(
        Plan(tuple(engine.chain.names), (2, 4), 0.1), tuple(1 + i % 4 for i in range(len(requests))), "fixed")  # 1, 2, 3, 4, 1, ...
    requests = [{"prompt_ids": p, "max_new_tokens": 9 + i % 4, "ignore_eos": True} for i, p in enumerate(prompts(7, 2000, 5))]
    alone = [engine.generate(**r).token_ids for r in requests]
    results = BatchLoop(engine, router).run(requests)
    assert [r.token_ids for r in results] == alone
    top_lens = {plan["draft_lens"][-1] for r in results for plan in r.routing["steps_by_plan"]}
    assert top_lens == {1, 2, 3, 4}


SMOL_PROMPTS = [
    "def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time",
    "for i in range(10):", "The three primary colors are", "class Stack:\n    def __init__(self):", "SELECT name FROM",
    "Water boils at", "def is_prime(n: int) -> bool:", "My favourite fruit is", "# Sort a list in Python\n",
    "The quick brown fox", "x = [1, 2, 3]\nprint(", "In 1969, astronauts", "def add(a, b):\n    return",
]


@pytest.fixture(scope="module")
def smol_alone(smollm2_dir):
    """Each prompt generated alone by the target (any lossless chain alone gives the same, greedy)."""
    engine = Engine("smollm2-135m", dtype="float32")
    ids = [engine.tokenizer(p)["input_ids"] for p in SMOL_PROMPTS]
    requests = [{"prompt_ids": p, "max_new_tokens": 6 + 2 * (i % 4), "ignore_eos": True} for i, p in enumerate(ids)]
    return requests, [engine.generate(**r).token_ids for r in requests]


@pytest.mark.parametrize("chain, draft_lens", [("smollm2-135m@int8,smollm2-135m", [3]), ("ngram,smollm2-135m", [4])])
def test_smollm2_16_concurrent_greedy_requests_equal_one_at_a_time(smol_alone, chain, draft_lens):
    requests, alone = smol_alone
    engine = Engine(chain, dtype="float32", draft_lens=draft_lens)
    loop = BatchLoop(engine)
    ids = [loop.submit(**r) for r in requests]
    results, batches = {}, []
    while loop.has_work:
        report = loop.step()
        batches.append(report.batch)
        results.update(report.finished)
    assert [results[i].token_ids for i in ids] == alone
    assert batches[0] == 16


def test_sampled_requests_in_a_batch_draw_as_they_do_alone(tiny_dirs):
    """Each request's generator is consumed in the same order as alone, so a seed gives the same
    sample whatever the batch-mates."""
    from specrouter.core.sampling import SamplingParams

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    params = SamplingParams(temperature=0.8, top_p=0.95)
    requests = [{"prompt_ids": p, "max_new_tokens": 10, "params": params, "seed": i, "ignore_eos": True}
                for i, p in enumerate(prompts(6, 2000, seed=4))]
    alone = [engine.generate(r["prompt_ids"], 10, params, r["seed"], ignore_eos=True).token_ids for r in requests]
    assert [r.token_ids for r in BatchLoop(engine).run(requests)] == alone
    assert len({tuple(a) for a in alone}) == len(alone)


def test_generate_many_gives_each_prompt_what_it_gets_alone_in_order(tiny_dirs):
    """Many prompts in one continuous batch (more than fit at once: the rest wait), request i seeded
    `seed + i`: each result is the one the prompt gets alone, in the prompts' order."""
    from specrouter.core.sampling import SamplingParams

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    data = prompts(6, 2000, seed=5)
    for params in (SamplingParams(), SamplingParams(temperature=0.8)):
        many = engine.generate_many(data, 8, params, seed=10, max_batch=4)
        assert [r.token_ids for r in many] == [engine.generate(p, 8, params, seed=10 + i).token_ids for i, p in enumerate(data)]
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values() if hasattr(level, "worker"))


def test_a_batched_requests_first_step_teaches_the_router_no_acceptance(tiny_dirs):
    """As for a request alone (specrouter/routing/router.py `taught`): its first step's verdicts are left out."""
    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    draft, target = list(engine.levels)
    router = router_for(engine, calibrate=False)
    router.plan = lambda requests, backlog=None, remaining=0.0: Decision(Plan((draft, target), (3,), 0.1), (3,) * len(requests), "fixed")
    loop = BatchLoop(engine, router)
    loop.submit(prompts(1, 2000, 3)[0], max_new_tokens=16, ignore_eos=True, klass="code")
    loop.step()
    assert router.acceptance.count("code", draft, target) == 0
    loop.step()
    assert router.acceptance.count("code", draft, target) > 0


def test_a_request_that_would_wait_past_the_limit_is_refused_and_the_admitted_all_finish(tiny_dirs):
    from specrouter.engine.request import Overloaded

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    requests = [{"prompt_ids": p, "max_new_tokens": 8, "ignore_eos": True} for p in prompts(5, 2000, seed=6)]
    alone = [engine.generate(**r).token_ids for r in requests]
    loop = BatchLoop(engine, max_batch=2, max_waiting=2)
    ids = [loop.submit(**r) for r in requests[:4]]  # 2 find a place at the next step, 2 wait
    assert loop.num_waiting == 2
    with pytest.raises(Overloaded) as refused:
        loop.submit(**requests[4])
    assert refused.value.reason == "waiting_requests" and len(loop.request_ids) == 4  # nothing queued
    loop.step()  # the batch is full and two wait: still refused
    with pytest.raises(Overloaded):
        loop.submit(**requests[4])
    results = {}
    while loop.has_work:
        results.update(loop.step().finished)
    assert [results[i].token_ids for i in ids] == alone[:4]
    assert loop.submit(**requests[4])  # room again


def test_waiting_prompt_tokens_have_their_own_limit(tiny_dirs):
    from specrouter.engine.request import Overloaded

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    loop = BatchLoop(engine, max_batch=1, max_waiting_tokens=25)
    loop.submit(list(range(1, 101)), 4)  # finds a place: its 100 tokens do not wait
    loop.submit(list(range(1, 21)), 4)  # waits with 20 tokens
    with pytest.raises(Overloaded) as refused:
        loop.submit(list(range(1, 11)), 4)  # 20 + 10 > 25
    assert refused.value.reason == "waiting_tokens"
    loop.submit(list(range(1, 6)), 4)  # 20 + 5 fits


def test_a_request_past_its_deadline_is_retired_waiting_or_running_and_frees_its_state(tiny_dirs):
    import time

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    p = prompts(3, 2000, seed=7)
    alone = engine.generate(p[0], 30, ignore_eos=True).token_ids
    loop = BatchLoop(engine, max_batch=2)
    keep = loop.submit(p[0], 30, ignore_eos=True)
    running = loop.submit(p[1], 400, ignore_eos=True, timeout_s=0.3)
    waiting = loop.submit(p[2], 400, ignore_eos=True, timeout_s=0.3)  # the batch is full: it waits
    results = dict(loop.step().finished)
    time.sleep(0.3)
    while loop.has_work:
        results.update(loop.step().finished)
    assert results[running].finish_reason == results[waiting].finish_reason == "timeout"
    assert 0 < len(results[running].token_ids) < 400 and results[waiting].token_ids == []
    assert results[keep].token_ids == alone
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values() if hasattr(level, "worker"))


def test_long_prompts_prefill_a_chunk_a_step_while_the_batch_goes_on_decoding(tiny_dirs, monkeypatch):
    """A prompt longer than `prefill_chunk` is cached a chunk per step, at positions cut by the prompt
    alone, by the target and by the drafter, at most one chunk's tokens a step in all; the request
    already decoding commits tokens on every one of those steps, and every output equals its request's
    alone."""
    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    short, *longs = [{"prompt_ids": (p * 30)[:n], "max_new_tokens": m, "ignore_eos": True}
                     for p, n, m in zip(prompts(3, 2000, seed=7), (9, 100, 70), (80, 12, 12))]
    alone = [BatchLoop(engine, max_batch=1, prefill_chunk=16).run([r])[0].token_ids for r in (short, *longs)]
    chunks = {name: [] for name in engine.levels}  # per level: (step, start, tokens) of each call asking for no rows
    step = 0
    for name, level in engine.levels.items():
        def forward(calls, allowed=None, name=name, real=level.worker.forward):
            chunks[name] += [(step, c.start, len(c.token_ids)) for c in calls if c.num_logits == 0]
            return real(calls, allowed)
        monkeypatch.setattr(level.worker, "forward", forward)
    loop = BatchLoop(engine, prefill_chunk=16)
    a = loop.submit(**short)
    loop.step()
    ids = [loop.submit(**r) for r in longs]
    results, first_token, a_steps = {}, {}, []
    while loop.has_work:
        step += 1
        report = loop.step()
        results.update(report.finished)
        first_token.update({i: step for i in ids if i in report.committed and i not in first_token})
        a_steps += [step] if a in report.committed else []
    assert [results[i].token_ids for i in (a, *ids)] == alone
    # 100 tokens: 6 chunks, its last 4 tokens in its first step; then the 70: 4 chunks
    expected = [(s, 16 * (s - 1), 16) for s in range(1, 7)] + [(s, 16 * (s - 8), 16) for s in range(8, 12)]
    assert chunks == {name: expected for name in engine.levels}
    assert first_token == {ids[0]: 7, ids[1]: 12}
    assert a_steps[:12] == list(range(1, 13))  # never stalled behind a prefill
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values())


def test_requests_wait_for_room_in_a_bounded_kv_cache_and_all_finish(tiny_gguf_dirs):
    """A llama.cpp model keeps every sequence's keys and values in one pool of positions: the loop admits
    requests, in order, while the positions they may come to hold fit in it; the others wait their turn
    instead of overflowing the pool (which would fail the pass, and with it every request in the batch)."""
    from specrouter.core.store import ModelStore

    spec = f"{tiny_gguf_dirs['draft']}@gguf,{tiny_gguf_dirs['target']}@gguf"
    engine = Engine(spec, draft_lens=[3], provider=ModelStore("float32", kv_cache_tokens=256), bit_exact=False)
    assert engine.kv_pool.positions == 256 and engine.max_positions == 256
    # 40 + 60 positions each, and a block of 3 (and one) past them: two fit in the pool at once, not three
    requests = [{"prompt_ids": (p * 8)[:40], "max_new_tokens": 60, "ignore_eos": True} for p in prompts(5, 2000, seed=3)]
    loop = BatchLoop(engine)
    ids = [loop.submit(**r) for r in requests]
    assert loop.num_waiting == 3
    results, batches = {}, []
    while loop.has_work:
        report = loop.step()
        batches.append(report.batch)
        results.update(report.finished)
    assert max(batches) == 2 and batches[-1] == 1  # the fifth ran alone at the end
    assert all(results[i].finish_reason == "length" and len(results[i].token_ids) == 60 for i in ids)
    assert all(level.worker.num_sequences() == 0 for level in engine.levels.values())
    with pytest.raises(ValueError, match="context window of 256"):
        loop.submit([1] * 200, 57)


def test_a_batch_never_takes_more_sequences_than_a_llamacpp_model_has_slots(tiny_gguf_dirs):
    from specrouter.core.levels import ModelLevel
    from specrouter.core.llamacpp import LlamaCppModel, LlamaCppView
    from specrouter.core.worker import ModelWorker

    engine = Engine(f"ngram,{tiny_gguf_dirs['target']}@gguf", draft_lens=[3], bit_exact=False)
    name = engine.target_name
    engine.replace_level(name, ModelLevel(name, ModelWorker(name, LlamaCppView(
        LlamaCppModel(f"{tiny_gguf_dirs['target']}/model.gguf", threads=2, max_sequences=3))), bit_exact=False))
    assert engine.kv_pool.sequences == 3
    loop = BatchLoop(engine)
    results = loop.run([{"prompt_ids": p, "max_new_tokens": 8, "ignore_eos": True} for p in prompts(7, 2000, seed=4)])
    assert all(len(r.token_ids) == 8 for r in results)



@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_plain_greedy_decoding_runs_passes_back_to_back_with_the_same_tokens(tiny_dirs, tiny_gguf_dirs, backend):
    """A step that drafts nothing runs several one-token passes in one call to the target (once a pass
    has been timed): the same tokens as one a step, each request's budget kept, every pass counted."""
    spec = tiny_dirs["target"] if backend == "torch" else f"{tiny_gguf_dirs['target']}@gguf"
    requests = [{"prompt_ids": p, "max_new_tokens": 5 + 6 * i, "ignore_eos": True} for i, p in enumerate(prompts(3, 2000, seed=4))]

    def run(decode_run_s: float) -> tuple[list, list[int]]:
        loop = BatchLoop(Engine(spec, dtype="float32"), decode_run_s=decode_run_s)  # a fresh cache each: same prefix state
        ids = [loop.submit(**r) for r in requests]
        results, per_step = {}, []
        while loop.has_work:
            report = loop.step()
            per_step += [len(tokens) for tokens in report.committed.values()]
            results.update(report.finished)
        return [results[i] for i in ids], per_step

    one_a_step, steps_plain = run(0.0)
    back_to_back, steps_run = run(60.0)  # as many passes a call as MAX_RUN allows
    assert [r.token_ids for r in back_to_back] == [r.token_ids for r in one_a_step]
    assert set(steps_plain) == {1} and max(steps_run) > 1 and len(steps_run) < len(steps_plain)
    assert [len(r.token_ids) for r in back_to_back] == [r["max_new_tokens"] for r in requests]
    assert [r.num_steps for r in back_to_back] == [r["max_new_tokens"] for r in requests]  # target passes


def test_sampled_requests_run_with_the_tokens_of_one_a_step_and_drafting_chains_do_not_run(tiny_dirs):
    """A sampled request runs too (each plain token is drawn by its position's generator, on the worker
    as on the router): the same tokens as one a step, fewer steps. A chain that drafts never runs."""
    from specrouter.core.sampling import SamplingParams

    request = {"prompt_ids": prompts(1, 2000, seed=5)[0], "max_new_tokens": 24, "ignore_eos": True}
    sampled = {**request, "params": SamplingParams(temperature=0.8, top_p=0.95), "seed": 3}
    engine = Engine(chain_spec(tiny_dirs, "target"), dtype="float32")
    without = BatchLoop(engine, decode_run_s=0.0).run([sampled])[0]
    loop, steps = BatchLoop(engine, decode_run_s=60.0), 0
    request_id = loop.submit(**sampled)
    while loop.has_work:
        report = loop.step()
        steps += 1
    assert report.finished[request_id].token_ids == without.token_ids and steps < len(without.token_ids)
    assert without.token_ids != BatchLoop(engine, decode_run_s=0.0).run([{**sampled, "seed": 4}])[0].token_ids

    engine = Engine(chain_spec(tiny_dirs, "draft,target"), dtype="float32", draft_lens=[3])
    for r in (request, sampled):
        without = BatchLoop(engine, decode_run_s=0.0).run([r])[0]
        default = BatchLoop(engine, decode_run_s=60.0).run([r])[0]
        assert default.token_ids == without.token_ids and default.num_steps == without.num_steps
