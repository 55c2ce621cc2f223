"""Calibration: seed a router's costs and acceptances by running the engine's levels before any request.

Costs: a few timed passes of every level over throwaway sequences (verification passes of several
block lengths, a drafted block), at one or more batch sizes. Acceptance: a prompt per class; the
target's own greedy continuation of each (CALIBRATION_TOKENS, one routed generation) is the text on
which every level's greedy agreement with every other is measured (teacher-forced: one pass per
level), so the first requests of a class start from measured acceptances, not from a blind prior.
The target's own output, not a fixed text: on a text it would not have written, drafter and target
agree far less often than on what they will really verify.
"""

from __future__ import annotations

import time

import torch

from specrouter.core.chain import drafted
from specrouter.core.levels import Level, NgramLevel, ProposeItem, ScoreItem
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState
from specrouter.engine.engine import Engine
from specrouter.engine.frontend import chat_ids
from specrouter.routing.profiler import BUCKETS, bucket
from specrouter.routing.router import AdaptiveRouter, RouterConfig, shared_devices, sibling_pairs

CALIBRATION_ROUNDS = 10.0  # what the calibration text's blocks are worth, in verification rounds
CALIBRATION_BLOCK = 8  # the blocks calibration simulates (from every other position of its text)
CALIBRATION_PROMPTS = {
    "code": 'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one sorted list."""\n',
    "chat": "How can I sleep better? Give me a few practical tips.",
    "summarization": (
        "Summarize the following in two sentences. The company's revenue grew by 12% last year, mainly thanks to "
        "strong sales in Europe and Asia. Costs rose faster than expected because of higher energy prices and new "
        "hires. The board plans to cut spending on marketing and to invest more in research next year."
    ),
}
CALIBRATION_TOKENS = 32
# The context the timed passes run after: about a prompt and some of its answer. A pass's rows each
# attend over it, so its cost grows with it, and the more so the more rows (a 1.5B w4 pass of 2 / 3
# tokens: 68-81 / 82-89 ms after 32 positions, 87-100 / 112-116 after 256): timed after too short a
# context, short blocks would look cheaper against long ones than requests find them.
CALIBRATION_CONTEXT = 256


def router_for(engine: Engine, config: RouterConfig = RouterConfig(), calibrate: bool = True,
               batches: tuple[int, ...] = (1,)) -> AdaptiveRouter:
    """A router over an engine's pool (every level but the last is a drafter candidate); with
    `calibrate`, its costs measured at these batch sizes and each class's acceptances measured."""
    names = list(engine.levels)
    stopping = frozenset(n for n, level in engine.levels.items() if level.min_confidence > 0)
    router = AdaptiveRouter(names[:-1], names[-1], {n: level.can_verify for n, level in engine.levels.items()}, config,
                            levels=engine.levels, stopping=stopping, hosts=shared_devices(names), siblings=sibling_pairs(names),
                            max_top_len=engine.levels[names[-1]].max_block,
                            lookup=frozenset(n for n, level in engine.levels.items() if isinstance(level, NgramLevel)))
    if calibrate:
        # each calibration sequence needs its context and the longest pass after it, in the models' window and KV pools
        room = engine.max_positions if engine.kv_pool is None else min(engine.max_positions, engine.kv_pool.positions // max(batches))
        calibrate_costs(router, engine.levels, batches, context=min(CALIBRATION_CONTEXT, room - router.longest_block() - 1))
        for klass, prompt in CALIBRATION_PROMPTS.items():
            ids = calibration_ids(engine.tokenizer, prompt, chat=klass != "code")
            continuation = engine.generate(ids, CALIBRATION_TOKENS, router=router, klass=klass).token_ids  # its rounds count too
            calibrate_acceptance(router, engine.levels, klass, ids + continuation, start=len(ids))
    return router


def calibrate_costs(router: AdaptiveRouter, levels: dict[str, Level], batches: tuple[int, ...] = (1,),
                    lengths: tuple[int, ...] | None = None, context: int = CALIBRATION_CONTEXT) -> None:
    """Seed the router's profiles with timed passes of every level at each batch size (calibration_passes),
    over blocks of `lengths` (default: the profiler's buckets up to the longest pass a plan can run on
    the level, a block of the longest draft length searched, or for the target of the longest it
    verifies bit-exactly (`max_top_len`), and the verifier's own token: a pass's cost is measured
    where plans need it, not extrapolated, as on a CPU it jumps where a kernel changes tiles)."""
    for name, level in levels.items():
        verified = router.longest_block()
        if name == router.target and router.max_top_len is not None:
            verified = min(verified, router.max_top_len)
        level_lengths = lengths or tuple(b for b in BUCKETS if b <= bucket(verified + 1))
        for batch in batches:
            for op, num_tokens, seconds in calibration_passes(level, batch, level_lengths, context):
                if op == "score":
                    router.profiler.observe_score(name, num_tokens, seconds, batch=batch)
                elif op == "prefill":
                    router.profiler.observe_prefill(name, num_tokens, seconds)
                else:
                    router.profiler.observe_draft(name, num_tokens, seconds, batch=batch)


def calibration_passes(level: Level, batch: int, lengths: tuple[int, ...], context: int) -> list[tuple[str, int, float]]:
    """Time a level's passes over `batch` throwaway sequences of `context` tokens (one batched pass for
    all of them): ("prefill", context tokens of them all, s) and ("score", block length, s) per length
    after it (verifiers only), and
    ("draft", n, s) for blocks of one and of up to four tokens drafted for all of them (n: the most any
    of them drafted, at least 1: one that stops unsure drafts fewer, an n-gram without a match none)."""
    params, out = SamplingParams(), []
    seqs = [SequenceState.new(f"calibrate-{level.name}-{batch}-{b}", list(range(1 + b, context + 1 + b))) for b in range(batch)]
    ctxs = [list(seq.token_ids) for seq in seqs]
    try:
        if level.can_verify:
            t0 = time.perf_counter()
            level.score([ScoreItem(seq, ctx[:-1], [], params) for seq, ctx in zip(seqs, ctxs)])  # the context
            out.append(("prefill", batch * (context - 1), time.perf_counter() - t0))
            for n in lengths:
                t0 = time.perf_counter()
                level.score([ScoreItem(seq, ctx, list(range(2, n + 1)), params) for seq, ctx in zip(seqs, ctxs)])
                out.append(("score", n, time.perf_counter() - t0))
        for n in (1, 4):  # a call's own share shows beside its tokens' only with two lengths
            t0 = time.perf_counter()
            blocks = level.propose([ProposeItem(seq, ctx, n, params, 0) for seq, ctx in zip(seqs, ctxs)])
            out.append(("draft", max(1, *(drafted(b, n) for b in blocks)), time.perf_counter() - t0))
    finally:
        for seq in seqs:
            level.release(seq.seq_id)
    return out


def calibrate_acceptance(router: AdaptiveRouter, levels: dict[str, Level], klass: str, ids: list[int], start: int = 1) -> None:
    """Every level's greedy next-token choice along `ids` (teacher-forced, one pass per model level;
    prompt lookup for n-gram levels); each (drafter, verifier) pair in pool order is observed into
    the router's table for the class as the rounds it would run over ids[start:]: a block of up to
    CALIBRATION_BLOCK from every other position, accepted while their choices agree.

    A drafter that stops unsure ends a block after a token it gave less than its min_confidence
    (its confidence along the text, as it drafts), as its real rounds do: the positions it would
    not draft count as its first missing one does (AcceptanceTable.observe_round), and its alpha
    is its agreement where it would draft, as the verdicts on its real blocks measure it (its
    agreement over every position is lower: it is unsure where it disagrees)."""
    params = SamplingParams()
    choices: dict[str, torch.Tensor] = {}  # level -> [T] argmax token after ids[:t+1], for ids[start:]
    sure: dict[str, list[bool]] = {}  # a level that stops unsure -> [T] whether it drafts on after that token
    for name in [*router.pool, router.target]:
        level = levels[name]
        if level.can_verify:
            seq = SequenceState.new(f"calibrate-alpha-{name}-{klass}", ids[:1])
            try:
                stops = name in router.stopping
                (scored,) = level.score([ScoreItem(seq, ids[:1], ids[1:], params, confident=stops)])  # p [T_all, V], top [T_all]
                if stops:
                    sure[name] = [float(c) >= level.min_confidence for c in scored.top[start - 1 : -1]]
                choices[name] = scored.p.argmax(-1)[start - 1 : -1]  # [T]
            finally:
                level.release(seq.seq_id)
        elif isinstance(level, NgramLevel):
            choices[name] = torch.tensor([(level.lookup(ids[: t + 1], 1) or [-1])[0] for t in range(start - 1, len(ids) - 1)])
    order = [n for n in [*router.pool, router.target] if n in choices]
    for i, drafter in enumerate(order):
        for verifier in order[i + 1:]:
            if levels[verifier].can_verify:
                agreed = (choices[drafter] == choices[verifier]).tolist()  # [T]
                rounds = calibration_rounds(agreed, sure.get(drafter))
                if drafter in sure:  # the tokens its blocks accepted, of those judged (accepted, and each first rejected)
                    accepted = sum(a for _, _, a in rounds)
                    alpha = accepted / max(1, accepted + sum(a < d for _, d, a in rounds))
                else:
                    alpha = sum(agreed) / max(1, len(agreed))
                router.acceptance.observe(klass, drafter, verifier, [alpha] * len(agreed))
                # the rounds, all of them together worth CALIBRATION_ROUNDS rounds: one short text is a
                # hint, and the rounds really run must soon outweigh it
                for asked, num_drafted, accepted in rounds:
                    router.acceptance.observe_round(klass, drafter, verifier, num_drafted, accepted, asked,
                                                    weight=CALIBRATION_ROUNDS / len(rounds))


def calibration_rounds(agreed: list[bool], sure: list[bool] | None = None) -> list[tuple[int, int, int]]:
    """(asked, drafted, accepted) of a block of up to CALIBRATION_BLOCK (as much as the text has left)
    from every other position of a text along which a drafter's choices `agreed` with its
    verifier's; with `sure` (a drafter that stops unsure: whether it drafts on after each
    position's token), each block ends after its first unsure token, as its drafting does."""
    rounds = []
    for t in range(0, len(agreed), 2):
        asked = num_drafted = min(CALIBRATION_BLOCK, len(agreed) - t)
        if sure is not None:
            num_drafted = next((j + 1 for j in range(asked) if not sure[t + j]), asked)
        accepted = next((j for j in range(num_drafted) if not agreed[t + j]), num_drafted)
        rounds.append((asked, num_drafted, accepted))
    return rounds


def calibration_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A prompt's token ids, as a chat request's (the tokenizer's chat template) where it has one."""
    if chat and tokenizer.chat_template:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]
