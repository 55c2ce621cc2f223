"""The versioned sequence-state protocol under a hostile transport: workers receive duplicated,
reordered, stale and dropped messages, and still never hold corrupted KV state, and the output
stays exactly the target's (docs/protocol.md)."""

import random
from dataclasses import replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specrouter.engine.engine import Engine
from specrouter.core.levels import ModelLevel
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import PositionGapError, StaleVersionError, TokenLog
from specrouter.core.worker import WorkerUnavailable

ACTIONS = ["deliver", "duplicate", "replay-old", "stale", "drop"]


class ChaoticWorker:
    """Wraps a real ModelWorker. Before each real call it may replay an earlier message (as a
    duplicate, reordered, or with an older version), or drop the call (the caller sees a timeout)."""

    def __init__(self, inner, actions: list[str], seed: int, can_drop: bool):
        self.inner, self.name, self.vocab_size, self.exact_width = inner, inner.name, inner.vocab_size, inner.exact_width
        self.kv_pool = inner.kv_pool
        self.actions, self.rng, self.can_drop = list(actions), random.Random(seed), can_drop
        self.history: list[tuple[str, tuple]] = []
        self.checked = 0

    def _replay(self, version_shift: int) -> None:
        method, calls, allowed = self.rng.choice(self.history)
        calls = [replace(c, version=max(0, c.version + version_shift)) for c in calls]
        for out in getattr(self.inner, method)(calls, allowed):
            assert not isinstance(out, Exception) or isinstance(out, (StaleVersionError, PositionGapError))  # refused, as the protocol says
        for c in calls:
            self.check(c.seq_id)

    def _call(self, method: str, calls: list, allowed):
        action = self.actions.pop(0) if self.actions else "deliver"
        if self.history and action == "duplicate":
            self._replay(0)
        elif self.history and action == "replay-old":
            self._replay(0)
        elif self.history and action == "stale":
            self._replay(-1)
        elif action == "drop" and self.can_drop:
            raise WorkerUnavailable(self.name, "dropped by the chaotic transport")
        self.history.append((method, calls, allowed))
        outs = getattr(self.inner, method)(calls, allowed)
        for c, out in zip(calls, outs):
            if not isinstance(out, Exception):  # the worker built on exactly the prefix the caller meant
                assert TokenLog(self.inner.cached_tokens(c.seq_id)[: c.start]).prefix_hash(c.start) == c.prefix_hash
            self.check(c.seq_id)
        return outs

    def check(self, seq_id: str) -> None:
        """No corrupted KV: the cache's last position gives the logits of a fresh forward."""
        tokens = self.inner.cached_tokens(seq_id)
        if len(tokens) < 2:
            return
        view = self.inner.view
        slot = self.inner._slots[seq_id]
        cached = view.forward(tokens[-1:], len(tokens) - 1, slot.cache, 1)
        fresh = view.forward(tokens, 0, view.new_cache(), 1)
        torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)
        self.checked += 1

    def forward(self, calls, allowed=None):
        return self._call("forward", calls, allowed)

    def draft(self, calls, allowed=None):
        return self._call("draft", calls, allowed)

    def release(self, seq_id):
        self.inner.release(seq_id)

    def num_sequences(self):
        return self.inner.num_sequences()


def test_token_log_prefix_hashes_identify_prefixes():
    a, b = TokenLog([1, 2, 3, 4]), TokenLog([1, 2, 9, 4])
    assert a.prefix_hash(2) == b.prefix_hash(2) and a.prefix_hash(3) != b.prefix_hash(3)
    a.put(2, [9, 4])
    assert a.tokens == b.tokens and a.prefix_hash(4) == b.prefix_hash(4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    draft_actions=st.lists(st.sampled_from(ACTIONS), max_size=20),
    slim_actions=st.lists(st.sampled_from(ACTIONS), max_size=20),
    target_actions=st.lists(st.sampled_from(ACTIONS[:4]), max_size=20),
    seed=st.integers(0, 1000),
)
def test_hostile_transport_never_corrupts_state_or_output(tiny_engines, draft_actions, slim_actions, target_actions, seed):
    engine, expected = tiny_engines
    draft_name, slim_name, target_name = engine.chain.names
    originals = {name: engine.levels[name] for name in engine.chain.names}
    chaotic = {  # the lower levels get several calls per version: replays within a version happen
        draft_name: ChaoticWorker(originals[draft_name].worker, draft_actions, seed, can_drop=True),
        slim_name: ChaoticWorker(originals[slim_name].worker, slim_actions, seed + 1, can_drop=True),
        target_name: ChaoticWorker(originals[target_name].worker, target_actions, seed + 2, can_drop=False),
    }
    for name, worker in chaotic.items():
        engine.replace_level(name, ModelLevel(name, worker))
    try:
        result = engine.generate_text("A stream of tokens", 24, ignore_eos=True, params=SamplingParams())
    finally:
        for name, level in originals.items():
            engine.replace_level(name, level)
    assert result.token_ids == expected
    assert all(worker.checked > 0 for worker in chaotic.values())


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_engines(tiny_dirs):
    expected = Engine(tiny_dirs["target"], dtype="float32").generate_text("A stream of tokens", 24, ignore_eos=True).token_ids
    engine = Engine(
        f"{tiny_dirs['draft']},{tiny_dirs['target']}@skip:1,{tiny_dirs['target']}", dtype="float32", draft_lens=[2, 4], retry_down_after_s=0.0
    )
    return engine, expected
