"""Shadow drafting: a drafter that costs next to nothing (prompt lookup) is measured on every step of
a routed request, also while its chains do not run.

The tokens a step commits are the target's own (greedy: its choices; sampling: its samples), so the
rounds the drafter would have run against the target over them can be replayed exactly: propose a
block after the context, accept while it matches the committed tokens, and go on after the first
mismatch, where the target would have emitted its own token. A match with a sampled token happens
with probability p_target(drafted token), the acceptance of a one-hot proposal, so the replay is
unbiased under sampling too. The records are those a real drafter -> target round gives, so the
router learns the pair's acceptance on every request's own text (an n-gram drafter accepts almost
nothing on most prompts and runs of tens of tokens on a few) without exploratory steps to measure it.
A replay costs 0.2-0.7 ms a step here (Qwen's 152k vocabulary), under 0.1% of a request. Only the
one-request loop (Engine.steps) replays; batched steps (specrouter/engine/loop.py) do not yet.
"""

from __future__ import annotations

import time

from specrouter.core.chain import drafted
from specrouter.core.levels import Level, ProposeItem
from specrouter.core.records import TimingRecord, VerifyRecord
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState


def shadow_records(level: Level, seq: SequenceState, committed: list[int], verifier: str, n: int) -> list:
    """The records of `level` drafting blocks of up to n for `verifier` over `committed`, the tokens
    a step committed after `seq`'s context. A round whose block runs past the committed tokens is
    judged on the positions they cover: agreement there, the rest unobserved (not a rejection)."""
    records: list = []
    context, params, pos = list(seq.token_ids), SamplingParams(), 0
    while pos < len(committed):
        known = min(n, len(committed) - pos)
        t0 = time.perf_counter()
        (block,) = level.propose([ProposeItem(seq, context + committed[:pos], n, params, seed=0)])
        seconds = time.perf_counter() - t0
        judged = block.token_ids[:known]
        accepted = next((i for i, (d, t) in enumerate(zip(judged, committed[pos:])) if d != t), len(judged))
        alphas = [1.0] * accepted + [0.0] * (accepted < len(judged))
        records.append(TimingRecord(level.name, "draft", drafted(block, n), seconds, asked=n))
        records.append(VerifyRecord(level.name, verifier, len(judged), accepted, alphas, known, replayed=True))
        pos += accepted + 1
    return records
