"""Asynchronous pipelining (PipeSpec-style draft-ahead) of the speculative step.

While the target verifies a block (in a background thread: a remote worker's gRPC call, or an
in-process pass that runs outside the GIL), the levels below draft the next block as if the current
one were accepted whole: k + 1 tokens after it, the first a guess of the target's bonus token. When
the verdict accepts the whole block and its bonus token equals the guess, the next step starts from
the k tokens after the guess and skips drafting; otherwise that work is thrown away, and each
drafter's cache rolls back to the committed prefix on its next call (by position, docs/protocol.md).

Lossless: a block drafted ahead is used only when its context is exactly the committed one, and its
tokens were drawn from the drafters' distributions given that context. The guess is drawn before
them, so keeping them only when it matches the bonus token selects on an earlier token, not on them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from specrouter.core.chain import Chain, StepContext, judge, propose, tokens_run, top_block_lens
from specrouter.core.levels import Block, ScoreItem
from specrouter.core.records import TimingRecord
from specrouter.core.sequence import SequenceState


@dataclass(frozen=True)
class DraftAhead:
    """A block drafted for a context the target had not yet confirmed."""

    chain: tuple[str, ...]  # the chain that drafted it (its rows are its top drafter's)
    prefix: tuple[int, ...]  # the context it continues
    block: Block

    def fits(self, chain: Chain, prefix: list[int]) -> bool:
        return self.chain == tuple(chain.names) and self.prefix == tuple(prefix) and len(self.block) > 0


def pipelined_step(
    chain: Chain,
    seqs: list[SequenceState],
    ctxs: list[StepContext],
    budgets: list[int],
    timings: list[TimingRecord],
    aheads: list[DraftAhead | None],
    pool: ThreadPoolExecutor,
    top_lens: list[int] | None = None,
) -> tuple[list[list[int]], list[DraftAhead | None]]:
    """`speculative_step` with the next blocks drafted while the target verifies; returns each
    sequence's committed tokens and the block drafted ahead for its next step (or None)."""
    top, n = len(chain.levels) - 1, len(seqs)
    ks = top_block_lens(chain, seqs, budgets, top_lens)
    prefixes = [list(seq.token_ids) for seq in seqs]
    target = chain.levels[top]

    # 1. this step's blocks: drafted ahead last step where they fit, drafted now where not
    blocks = [Block([], torch.empty(0, target.vocab_size)) for _ in seqs]
    for b, ahead in enumerate(aheads):
        if ks[b] > 0 and ahead is not None and ahead.fits(chain, prefixes[b]):
            blocks[b] = Block(ahead.block.token_ids[: ks[b]], ahead.block.q_draft[: ks[b]])
    fresh = [b for b in range(n) if ks[b] > 0 and not len(blocks[b])]
    if fresh:
        drafted = propose(chain, top - 1, [seqs[b] for b in fresh], [prefixes[b] for b in fresh], [ks[b] for b in fresh],
                           [ctxs[b] for b in fresh], timings)
        for b, block in zip(fresh, drafted):
            blocks[b] = block

    # 2. the target verifies in the background ...
    items = [ScoreItem(seq, prefix, block.token_ids, ctx.params) for seq, prefix, block, ctx in zip(seqs, prefixes, blocks, ctxs)]
    fed = max(tokens_run(target, seq, prefix, len(block)) for seq, prefix, block in zip(seqs, prefixes, blocks))
    t0 = time.perf_counter()
    pending = pool.submit(target.score, items)

    # 3. ... while the drafters continue past each block (k + 1 tokens: a guess at the bonus, then the next block)
    ahead_of = [b for b in range(n) if ks[b] > 0 and budgets[b] > ks[b] + 1 and not ctxs[b].eos_ids.intersection(blocks[b].token_ids)]
    guesses: dict[int, Block] = {}
    try:
        if ahead_of:
            drafted = propose(chain, top - 1, [seqs[b] for b in ahead_of], [prefixes[b] + blocks[b].token_ids for b in ahead_of],
                              [ks[b] + 1 for b in ahead_of], [ctxs[b] for b in ahead_of], timings)
            guesses = dict(zip(ahead_of, drafted))
    finally:
        scored = pending.result()  # p [len(block) + 1, V] each; a failed verification raises here first
    seconds = time.perf_counter() - t0
    timings.append(TimingRecord(target.name, "score", fed, seconds, n))

    # 4. verdicts; keep a block drafted ahead only where the whole block and the guessed bonus held
    verdicts = [judge(chain, top, block, s.p, seconds, ctx, k, len(prefix))
                for block, s, ctx, k, prefix in zip(blocks, scored, ctxs, ks, prefixes)]
    next_aheads: list[DraftAhead | None] = [None] * n
    for b, guess in guesses.items():
        verdict = verdicts[b]
        if verdict.num_accepted == len(blocks[b]) and len(guess) > 1 and guess.token_ids[0] == verdict.tokens[-1]:
            rest = Block(guess.token_ids[1:], guess.q_draft[1:])
            next_aheads[b] = DraftAhead(tuple(chain.names), tuple(prefixes[b] + verdict.tokens), rest)
    return [verdict.tokens[:budget] for verdict, budget in zip(verdicts, budgets)], next_aheads

