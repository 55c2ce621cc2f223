"""The gRPC data plane on loopback: a remote worker is indistinguishable from an in-process one."""

import pytest
import torch

from conftest import tiny_llama
from specrouter.chain import Chain, LevelStats, StepContext, speculative_step
from specrouter.dataplane import BackgroundServer, RemoteWorker, WorkerServicer
from specrouter.levels import ModelLevel
from specrouter.model import ModelView
from specrouter.sampling import SamplingParams
from specrouter.sequence import PositionGapError, SequenceState, StaleVersionError, TokenLog
from specrouter.worker import ModelWorker, WorkerUnavailable

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
        assert torch.equal(remote.forward("s", 0, 0, EMPTY, ids, 3, params), local.forward("s", 0, 0, EMPTY, ids, 3, params))
        a, b = remote.draft("d", 0, 0, EMPTY, ids, 4, params, seed=3), local.draft("d", 0, 0, EMPTY, ids, 4, params, seed=3)
        assert a.token_ids == b.token_ids and torch.equal(a.q_draft, b.q_draft)
        remote.release("s"), remote.release("d"), local.release("s"), local.release("d")
    assert remote.vocab_size == V and remote.bytes_moved > 0


def test_protocol_errors_cross_the_wire_typed(served):
    _, server = served
    remote = RemoteWorker("t@skip:1", lambda: server.address)
    remote.forward("p", 5, 0, EMPTY, list(range(10)), 1, SamplingParams())
    with pytest.raises(StaleVersionError):
        remote.forward("p", 4, 5, TokenLog(list(range(5))).prefix_hash(5), [1], 1, SamplingParams())
    with pytest.raises(PositionGapError):
        remote.forward("p", 5, 50, 0, [1], 1, SamplingParams())
    assert remote.truncate("p", 5, 3) == 3 and remote.truncate("p", 5, 3) == 3  # idempotent
    remote.forward("p", 5, 3, TokenLog([0, 1, 2]).prefix_hash(3), [1, 2], 1, SamplingParams())  # the stream still serves after errors


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
            seq = seq.commit(speculative_step(chain, seq, ctx, 20 - len(seq.generated)))
        outputs.append(seq.generated)
        for level in chain.levels:
            level.release("x")
    assert outputs[0] == outputs[1]


def test_unreachable_worker_raises_worker_unavailable():
    with pytest.raises(WorkerUnavailable):
        RemoteWorker("gone", lambda: "127.0.0.1:9", timeout_s=5)


class KillAtStep:
    """A route that runs the engine's static chain and stops a server before step `at`."""

    def __init__(self, plan, server, at: int):
        self.plan, self.server, self.at, self.steps = plan, server, at, 0

    def next_plan(self):
        self.steps += 1
        if self.steps == self.at:
            self.server.stop()
        return self.plan

    def observe(self, records, committed, seconds):
        pass

    def explain(self):
        return {}


def test_dead_drafter_shortens_the_chain_and_output_is_unchanged(tiny_dirs):
    from specrouter.engine import Engine
    from specrouter.scheduler import Plan

    engine = Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3])
    expected = engine.generate_text("Once upon a time", 40, ignore_eos=True).token_ids
    drafter = engine.chain.levels[0]
    server = BackgroundServer(WorkerServicer("draft", {drafter.name: drafter.worker}))
    engine.replace_level(drafter.name, ModelLevel(drafter.name, RemoteWorker(drafter.name, lambda: server.address, timeout_s=10)))
    route = KillAtStep(Plan(tuple(engine.chain.names), (3,), 0.0), server, at=4)
    result = engine.generate_text("Once upon a time", 40, ignore_eos=True, route=route)
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
    from specrouter.dataplane import decode_rows, encode_rows
    from specrouter.sampling import probs_from_logits

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
        a, b = remote.draft("m", 0, 0, EMPTY, ids, 5, params, 7, allowed), local.draft("m", 0, 0, EMPTY, ids, 5, params, 7, allowed)
        assert a.token_ids == b.token_ids and all(t % 3 == 0 for t in a.token_ids)
        assert torch.equal(a.q_draft, b.q_draft) and float(a.q_draft[:, ~allowed].sum()) == 0.0
        assert "allowed_bits" not in remote._mask(allowed)  # the mask went once: now it is named only
        p = remote.forward("m", 0, 0, EMPTY, ids, 2, params, allowed)
        assert torch.equal(p, local.forward("m", 0, 0, EMPTY, ids, 2, params, allowed))
        remote.release("m"), local.release("m")
