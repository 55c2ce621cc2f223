"""The gRPC data plane on loopback: a remote worker is indistinguishable from an in-process one."""

import threading
import time

import pytest
import torch

from conftest import draft_one, forward_one, tiny_llama
from specrouter.core.chain import Chain, StepContext, speculative_step
from specrouter.runtime.dataplane import RemoteWorker, WorkerServicer, model_thread
from specrouter.runtime.grpc_server import BackgroundServer
from specrouter.core.levels import ModelLevel, ScoreItem
from specrouter.core.model import ModelView
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import PositionGapError, SequenceState, StaleVersionError, TokenLog
from specrouter.core.worker import ModelWorker, WorkerUnavailable

V = 300
EMPTY = TokenLog().prefix_hash(0)


@pytest.fixture(scope="module")
def served():
    target = tiny_llama(0, V)
    workers = {"t": ModelWorker("t", ModelView(target)), "t@skip:1": ModelWorker("t@skip:1", ModelView(target, (1,)))}
    server = BackgroundServer(WorkerServicer("tiny", workers))
    yield target, server
    server.stop()


def test_remote_forward_equals_local_for_greedy_and_sampling(served):
    target, server = served
    remote = RemoteWorker("t", lambda: server.address)
    local = ModelWorker("local", ModelView(target))
    ids = list(range(5, 25))
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=20)):
        assert torch.equal(forward_one(remote, "s", 0, 0, EMPTY, ids, 3, params), forward_one(local, "s", 0, 0, EMPTY, ids, 3, params))
        a, b = draft_one(remote, "d", 0, 0, EMPTY, ids, 4, params, 3), draft_one(local, "d", 0, 0, EMPTY, ids, 4, params, 3)
        assert a.token_ids == b.token_ids and torch.equal(a.q_draft, b.q_draft)
        # A plain call (the target decoding for itself): the same tokens, no distributions sent back.
        a, b = (draft_one(w, "p", 0, 0, EMPTY, ids, 4, params, 3, 0.0, True) for w in (remote, local))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 4 and a.q_draft.shape == b.q_draft.shape == (0, V)
        # A random tiny model is never sure of a token: with min_confidence both stop after the first.
        a, b = (draft_one(w, "c", 0, 0, EMPTY, ids, 4, params, 3, 0.5) for w in (remote, local))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 1
        # Each row's confidence in its most likely token (a middle level's stop) travels beside greedy one-hot rows.
        (p_remote, top_remote), (p_local, top_local) = (forward_one(w, "f", 0, 0, EMPTY, ids, 3, params, confident=True)
                                                              for w in (remote, local))
        assert torch.equal(p_remote, p_local) and top_remote == pytest.approx(top_local) and len(top_local) == 3
        assert top_local == pytest.approx(torch.softmax(local.view.forward(ids, 0, local.view.new_cache(), 3), -1).max(-1).values.tolist())
        for w in (remote, local):
            w.release("s"), w.release("d"), w.release("p"), w.release("c"), w.release("f")
    assert remote.vocab_size == V and remote.bytes_moved > 0


def test_model_calls_run_on_the_thread_the_model_was_loaded_on():
    """One OpenMP pool per worker process: a second thread running the model would throttle both."""
    thread = model_thread("tiny")
    loaded_on = thread.submit(threading.get_ident).result()
    worker = thread.submit(lambda: ModelWorker("t", ModelView(tiny_llama(0, V)))).result()
    ran_on = []
    forward = worker.forward
    worker.forward = lambda *args: (ran_on.append(threading.get_ident()), forward(*args))[1]
    server = BackgroundServer(WorkerServicer("tiny", {"t": worker}, thread))
    try:
        forward_one(RemoteWorker("t", lambda: server.address), "s", 0, 0, EMPTY, [1, 2, 3], 1, SamplingParams())
    finally:
        server.stop()
    assert ran_on == [loaded_on]


def test_protocol_errors_cross_the_wire_typed(served):
    _, server = served
    remote = RemoteWorker("t@skip:1", lambda: server.address)
    forward_one(remote, "p", 5, 0, EMPTY, list(range(10)), 1, SamplingParams())
    with pytest.raises(StaleVersionError):
        forward_one(remote, "p", 4, 5, TokenLog(list(range(5))).prefix_hash(5), [1], 1, SamplingParams())
    with pytest.raises(PositionGapError):
        forward_one(remote, "p", 5, 50, 0, [1], 1, SamplingParams())
    rolled_back = [forward_one(remote, "p", 5, 3, TokenLog([0, 1, 2]).prefix_hash(3), [1, 2], 1, SamplingParams()) for _ in range(2)]
    assert torch.equal(*rolled_back)  # the stream still serves after errors; a repeated rollback is idempotent


def test_chain_over_remote_workers_equals_in_process(served):
    target, server = served
    draft = tiny_llama(7, V)
    remote_chain = Chain([ModelLevel("d", ModelWorker("d", ModelView(draft))), ModelLevel("t", RemoteWorker("t", lambda: server.address))], [3])
    local_chain = Chain([ModelLevel("d2", ModelWorker("d2", ModelView(draft))), ModelLevel("t2", ModelWorker("t2", ModelView(target)))], [3])
    outputs = []
    for chain in (remote_chain, local_chain):
        seq = SequenceState.new("x", [4, 8, 15, 16, 23, 42])
        ctx = StepContext(SamplingParams(), torch.Generator().manual_seed(0), frozenset())
        while len(seq.generated) < 20:
            seq = seq.commit(speculative_step(chain, [seq], [ctx], [20 - len(seq.generated)], [])[0])
        outputs.append(seq.generated)
        for level in chain.levels:
            level.release("x")
    assert outputs[0] == outputs[1]


def test_a_remote_level_prefills_prompt_chunks_and_scores_as_after_one_prefill(served):
    """A level caches a long prompt's leading chunks over the wire (calls asking for no rows), and its
    distributions after them equal those after the prompt cached in one pass."""
    target, server = served
    prompt = [(7 * i + 3) % V for i in range(40)]
    remote = ModelLevel("t", RemoteWorker("t", lambda: server.address))
    seq = SequenceState.new("chunked", prompt)
    for end in (16, 32):
        remote.prefill([(seq, prompt[:end])])
        assert remote.backlog("chunked", len(prompt)) == len(prompt) - end
    chunked = remote.score([ScoreItem(seq, prompt, [5, 6], SamplingParams(temperature=1.0))])[0].p
    local = ModelLevel("l", ModelWorker("l", ModelView(target)))
    whole = local.score([ScoreItem(SequenceState.new("whole", prompt), prompt, [5, 6], SamplingParams(temperature=1.0))])[0].p
    assert chunked.shape == whole.shape == (3, V) and torch.allclose(chunked, whole, atol=1e-5)
    remote.release("chunked")


def test_unreachable_worker_raises_worker_unavailable():
    with pytest.raises(WorkerUnavailable):
        RemoteWorker("gone", lambda: "127.0.0.1:9", timeout_s=5)


class KillAtStep:
    """A router that plans the engine's static chain and stops a server before step `at`."""

    def __init__(self, plan, server, at: int):
        self.fixed, self.server, self.at, self.steps = plan, server, at, 0

    def longest_block(self) -> int:
        return max(self.fixed.draft_lens)

    def plan(self, requests, backlog=None, remaining=None):
        from specrouter.routing.router import Decision

        self.steps += 1
        if self.steps == self.at:
            self.server.stop()
        return Decision(self.fixed, (self.fixed.draft_lens[-1],) * len(requests), "fixed")

    def observe(self, requests, records, timings=(), seconds=None):
        pass


def test_dead_drafter_shortens_the_chain_and_output_is_unchanged(tiny_dirs):
    from specrouter.engine.engine import Engine
    from specrouter.routing.scheduler import Plan

    engine = Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3])
    expected = engine.generate_text("Once upon a time", 40, ignore_eos=True).token_ids
    drafter = engine.chain.levels[0]
    server = BackgroundServer(WorkerServicer("draft", {drafter.name: drafter.worker}))
    engine.replace_level(drafter.name, ModelLevel(drafter.name, RemoteWorker(drafter.name, lambda: server.address, timeout_s=10)))
    router = KillAtStep(Plan(tuple(engine.chain.names), (3,), 0.0), server, at=4)
    result = engine.generate_text("Once upon a time", 40, ignore_eos=True, router=router)
    assert result.token_ids == expected
    assert drafter.name in engine.down
    assert result.level_stats[0].num_draft_tokens > 0  # it drafted before it died


@pytest.mark.parametrize("params, kind", [
    (SamplingParams(), "argmax"),
    (SamplingParams(temperature=0.9, top_k=8), "index"),
    (SamplingParams(temperature=0.9, top_p=0.5), "index"),
    (SamplingParams(temperature=0.9), "rows"),
])
def test_rows_travel_exactly_in_the_cheapest_encoding(params, kind):
    from specrouter.runtime.dataplane import decode_rows, encode_rows
    from specrouter.core.sampling import probs_from_logits

    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)) * 3
    probs = probs_from_logits(logits, params)  # [4, V]
    encoded = encode_rows(probs, params)
    assert kind in encoded
    assert torch.equal(decode_rows(encoded, 5000), probs)
    if kind == "index":
        assert len(encoded["value"]) < probs.numel() * 4 / 10  # far below the dense float32 rows


def test_remote_worker_restricted_to_a_token_mask_equals_local(served):
    target, server = served
    remote = RemoteWorker("t", lambda: server.address)
    local = ModelWorker("local", ModelView(target))
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[::3] = True
    ids = list(range(30, 50))
    for params in (SamplingParams(), SamplingParams(temperature=0.9)):
        a, b = (draft_one(w, "m", 0, 0, EMPTY, ids, 5, params, 7, allowed=allowed) for w in (remote, local))
        assert a.token_ids == b.token_ids and all(t % 3 == 0 for t in a.token_ids)
        assert torch.equal(a.q_draft, b.q_draft) and float(a.q_draft[:, ~allowed].sum()) == 0.0
        assert "allowed_bits" not in remote._mask(allowed)  # the mask went once: now it is named only
        p = forward_one(remote, "m", 0, 0, EMPTY, ids, 2, params, allowed=allowed)
        assert torch.equal(p, forward_one(local, "m", 0, 0, EMPTY, ids, 2, params, allowed=allowed))
        remote.release("m"), local.release("m")


# -- batched calls: one frame per batch ------------------------------------------------------------------

SAMPLED = SamplingParams(temperature=0.9, top_k=20)


class CountingServicer(WorkerServicer):
    """Records every frame it handles as (op, number of batched calls)."""

    def __init__(self, name, workers):
        super().__init__(name, workers)
        self.frames: list[tuple[str, int]] = []

    def handle(self, request):
        self.frames.append((request["op"], len(request.get("calls", []))))
        return super().handle(request)


@pytest.fixture
def counted(served):
    target, _ = served
    servicer = CountingServicer("tiny", {"t": ModelWorker("t", ModelView(target))})
    server = BackgroundServer(servicer)
    yield target, servicer, RemoteWorker("t", lambda: server.address)
    server.stop()


def test_a_remote_forward_batch_is_one_frame_and_equals_per_sequence_calls(counted):
    from specrouter.core.worker import ForwardCall

    target, servicer, remote = counted
    local = ModelWorker("local", ModelView(target))
    hist = {"a": list(range(3, 13)), "b": list(range(20, 34))}
    for w in (remote, local):
        for s, tokens in hist.items():
            forward_one(w, s, 0, 0, EMPTY, tokens, 1, SamplingParams())
    # a continues, b rolls back its last 3 (rejected) tokens, c prefills from 0: three positions, mixed sampling
    starts = {"a": 10, "b": 11, "c": 0}
    hist["c"] = []
    calls = [ForwardCall(s, 1, starts[s], TokenLog(hist[s][: starts[s]]).prefix_hash(starts[s]), [40, 41, 42], 2, params)
             for s, params in zip("abc", (SamplingParams(), SAMPLED, SAMPLED))]
    servicer.frames.clear()
    before = remote.bytes_moved
    batched = remote.forward(calls)
    assert servicer.frames == [("forward", 3)]  # one frame, one batched pass for the three
    assert remote.bytes_moved > before
    for call, scored in zip(calls, batched):
        ref = forward_one(local, call.seq_id, 1, call.start, call.prefix_hash, call.token_ids, 2, call.params)
        torch.testing.assert_close(scored.p, ref, atol=1e-6, rtol=1e-5)
        assert servicer.workers["t"].cached_tokens(call.seq_id) == hist[call.seq_id][: call.start] + [40, 41, 42]


def test_a_remote_forward_batch_carries_each_confident_rows_confidence(counted):
    from specrouter.core.worker import ForwardCall

    target, servicer, remote = counted
    local = ModelWorker("local", ModelView(target))
    calls = [ForwardCall(s, 0, 0, EMPTY, list(range(5 + i, 15 + i)), 3, params, confident=True)
             for i, (s, params) in enumerate(zip("gh", (SamplingParams(), SAMPLED)))]
    servicer.frames.clear()
    batched = remote.forward(calls)
    assert servicer.frames == [("forward", 2)]
    for got, ref in zip(batched, local.forward(calls)):
        torch.testing.assert_close(got.p, ref.p, atol=1e-6, rtol=1e-5)
        assert got.top == pytest.approx(ref.top) and len(got.top) == 3
    for call in calls:
        remote.release(call.seq_id)


def test_a_remote_draft_batch_is_one_frame_and_equals_each_draft_alone(counted):
    from specrouter.core.worker import DraftCall

    target, servicer, remote = counted
    local = ModelWorker("local", ModelView(target))
    calls = [DraftCall(s, 0, 0, EMPTY, list(range(2 + i, 9 + 3 * i)), k, params, seed=10 + i, min_confidence=conf)
             for i, (s, k, params, conf) in enumerate(zip("defg", (3, 1, 0, 5), (SAMPLED, SamplingParams(), SAMPLED, SamplingParams()),
                                                         (0.0, 0.0, 0.0, 0.5)))]
    servicer.frames.clear()
    drafted = remote.draft(calls)
    assert servicer.frames == [("draft", 4)]
    for call, got in zip(calls, drafted):
        ref = draft_one(local, call.seq_id, 0, 0, EMPTY, call.token_ids, call.k, call.params, call.seed, call.min_confidence)
        assert got.token_ids == ref.token_ids and len(got.token_ids) == (1 if call.min_confidence else call.k)
        torch.testing.assert_close(got.q_draft, ref.q_draft, atol=1e-6, rtol=1e-5)
        assert got.confidence == pytest.approx(ref.confidence) and len(got.confidence) == len(got.token_ids)


def test_a_stale_or_gapped_call_in_a_remote_batch_is_refused_alone(counted):
    from specrouter.core.worker import ForwardCall

    _, servicer, remote = counted
    for s in "ab":
        forward_one(remote, s, 0, 0, EMPTY, [1, 2, 3], 1, SamplingParams())
    forward_one(remote, "a", 5, 2, TokenLog([1, 2]).prefix_hash(2), [3], 1, SamplingParams())  # a is at version 5: a version-1 call is stale
    h3 = TokenLog([1, 2, 3]).prefix_hash(3)
    calls = [ForwardCall("a", 1, 3, h3, [9], 1, SamplingParams()), ForwardCall("b", 1, 3, h3, [9], 1, SAMPLED),
             ForwardCall("c", 0, 2, TokenLog([1, 2]).prefix_hash(2), [9], 1, SamplingParams())]  # c holds nothing: a gap
    stale, ok, gap = remote.forward(calls)
    assert isinstance(stale, StaleVersionError) and isinstance(gap, PositionGapError)
    assert ok.p.shape == (1, V) and abs(float(ok.p.sum()) - 1.0) < 1e-5
    worker = servicer.workers["t"]
    assert worker.cached_tokens("a") == [1, 2, 3] and worker.cached_tokens("b") == [1, 2, 3, 9] and worker.cached_length("c") == 0


def test_level_over_remote_worker_batches_and_resends_only_the_lost_sequence(counted):
    target, servicer, remote = counted
    remote_level, local_level = ModelLevel("t", remote), ModelLevel("t2", ModelWorker("t2", ModelView(target)))
    seqs = [SequenceState.new(s, list(range(5 + i, 15 + 2 * i))) for i, s in enumerate("xyz")]
    for level in (remote_level, local_level):
        level.score([ScoreItem(seq, list(seq.token_ids), [7], SamplingParams()) for seq in seqs])
    servicer.workers["t"].release("y")  # the worker lost y (its mirror still thinks it is cached)
    servicer.frames.clear()
    items = [ScoreItem(seq, list(seq.token_ids) + [7], [8, 9], SAMPLED) for seq in seqs]
    got, want = remote_level.score(items), local_level.score(items)
    assert servicer.frames == [("forward", 3), ("forward", 1)]  # only y is resent, from position 0
    for scored, ref in zip(got, want):
        torch.testing.assert_close(scored.p, ref.p, atol=1e-6, rtol=1e-5)
    assert servicer.workers["t"].cached_tokens("y") == list(seqs[1].token_ids) + [7, 8, 9]


class DiesOnBatch(WorkerServicer):
    """Stops its own server while it runs a batched call (the worker process dies mid-batch)."""

    server, reached = None, False

    def handle(self, request):
        if request["op"] == "forward":
            self.reached = True
            threading.Thread(target=self.server.stop, daemon=True).start()
            time.sleep(0.5)
        return super().handle(request)


def test_worker_dying_mid_batch_raises_worker_unavailable(served):
    from specrouter.core.worker import ForwardCall

    target, _ = served
    servicer = DiesOnBatch("tiny", {"t": ModelWorker("t", ModelView(target))})
    servicer.server = BackgroundServer(servicer)
    remote = RemoteWorker("t", lambda: servicer.server.address, timeout_s=5)
    with pytest.raises(WorkerUnavailable):
        remote.forward([ForwardCall(s, 0, 0, EMPTY, [1, 2, 3], 1, SamplingParams()) for s in "ab"])
    assert servicer.reached


def test_remote_batches_restricted_to_a_token_mask_equal_local(counted):
    from specrouter.core.worker import DraftCall, ForwardCall

    target, servicer, remote = counted
    local = ModelWorker("local", ModelView(target))
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[1::4] = True
    drafts = [DraftCall("m", 0, 0, EMPTY, list(range(30, 44)), 3, SAMPLED, 5),
              DraftCall("n", 0, 0, EMPTY, list(range(31, 44)), 3, SamplingParams(), 6)]
    for got, call in zip(remote.draft(drafts, allowed), drafts):
        ref = draft_one(local, call.seq_id, 0, 0, EMPTY, call.token_ids, 3, call.params, call.seed, allowed=allowed)
        assert got.token_ids == ref.token_ids and all(t % 4 == 1 for t in got.token_ids)
        torch.testing.assert_close(got.q_draft, ref.q_draft, atol=1e-6, rtol=1e-5)
    assert "allowed_bits" not in remote._mask(allowed)  # the batch sent the mask once: now it is named only
    calls = [ForwardCall(s, 0, 0, EMPTY, list(range(30 + i, 44)), 2, SAMPLED) for i, s in enumerate("op")]
    for got, call in zip(remote.forward(calls, allowed), calls):
        ref = forward_one(local, call.seq_id, 0, 0, EMPTY, call.token_ids, 2, SAMPLED, allowed=allowed)
        torch.testing.assert_close(got.p, ref, atol=1e-6, rtol=1e-5)
        assert float(got.p[:, ~allowed].sum()) == 0.0
