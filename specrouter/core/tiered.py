"""Tiered (lossy) verification of a chain's top step: the opt-in mode named "tiered".

The level below the target proposes each sequence's block with its confidence in every token, which
puts the token in a tier (specrouter/core/tiers.py). Then, per block:
1. a block holding a tier-3 token goes to the full target, which verifies it as `speculative_step`
   does (so does every block of a request in lossless mode, and an empty block);
2. otherwise a block holding a tier-2 token goes to the slim verifier (a skip-layer view of the
   target, `Chain.slim`): its tier-1 tokens are kept as drafted, its tier-2 tokens are verified by
   rejection sampling against the slim verifier's distributions (greedy: its argmax), and the first
   one it rejects is replaced by its recovered token, which ends the block. The slim verifier adds no
   bonus token: every committed token is one the drafter proposed or the slim verifier's correction;
3. otherwise (every token tier 1) the block is committed as drafted, with no check.
The target did not see the tokens of 2 and 3: its level mirror resends what its worker has not
cached, so its next pass first catches up on them, and its cache equals a prefill of the committed
tokens. Without a slim verifier, tier 2 goes to the full target too.
"""

from __future__ import annotations

import time

import torch

from specrouter.core.chain import Chain, StepContext, _match_vocab, propose_blocks, score_blocks, top_block_lens
from specrouter.core.levels import Block, ScoreItem
from specrouter.core.records import TimingRecord
from specrouter.core.sequence import SequenceState
from specrouter.core.tiers import TIER_SLIM, TIER_TARGET, TIER_UNCHECKED
from specrouter.core.verification import rejection_sample


def block_tiers(chain: Chain, ctx: StepContext, block: Block) -> list[int]:
    """Each token's tier: tier 3 throughout for a lossless request, an empty block, or a block
    without confidences; tier 2 is tier 3 where the chain has no slim verifier."""
    if ctx.tiered is None or not len(block) or block.confidence is None:
        return [TIER_TARGET] * len(block)
    tiers = ctx.tiered.tiers(block.confidence)
    return [TIER_TARGET if t == TIER_SLIM and chain.slim is None else t for t in tiers]


def tiered_step(chain: Chain, seqs: list[SequenceState], ctxs: list[StepContext], budgets: list[int],
                timings: list[TimingRecord], top_lens: list[int] | None = None) -> list[list[int]]:
    """`speculative_step` with tiered verification for the requests that ask for it; the committed
    tokens of each sequence (at least one, at most its budget), counted into its `ctx.tiers`."""
    top = len(chain.levels) - 1
    lossy = [ctx.tiered is not None and not ctx.tiered.lossless for ctx in ctxs]
    ks = top_block_lens(chain, seqs, [budget + extra for budget, extra in zip(budgets, lossy)], top_lens)
    prefixes = [list(seq.token_ids) for seq in seqs]
    # 1. the level below the target proposes every block, with its confidences
    blocks = propose_blocks(chain, top, seqs, prefixes, ks, ctxs, timings)
    tiers = [block_tiers(chain, ctx, block) for ctx, block in zip(ctxs, blocks)]
    to_target = [b for b, t in enumerate(tiers) if not t or TIER_TARGET in t]
    to_slim = [b for b, t in enumerate(tiers) if t and TIER_TARGET not in t and TIER_SLIM in t]
    committed: list[list[int]] = [list(block.token_ids) for block in blocks]  # all tier 1: as drafted
    decided: list[list[int]] = [list(t) for t in tiers]  # the tier that decided each committed token
    # 2. the full target verifies the blocks holding a tier-3 token
    if to_target:
        verdicts, _ = score_blocks(chain, top, [seqs[b] for b in to_target], [prefixes[b] for b in to_target],
                                   [blocks[b] for b in to_target], [ks[b] for b in to_target], [ctxs[b] for b in to_target], timings)
        for b, verdict in zip(to_target, verdicts):
            committed[b], decided[b] = verdict.tokens, [TIER_TARGET] * len(verdict.tokens)
    # 3. the slim verifier checks the blocks holding a tier-2 token
    if to_slim:
        checked = slim_verify(chain, [seqs[b] for b in to_slim], [prefixes[b] for b in to_slim], [blocks[b] for b in to_slim],
                              [tiers[b] for b in to_slim], [ctxs[b] for b in to_slim])
        for b, (tokens, rejected) in zip(to_slim, checked):
            committed[b] = tokens
            decided[b] = tiers[b][: len(tokens) - 1] + [TIER_SLIM] if rejected else tiers[b][: len(tokens)]
            ctxs[b].tiers.slim_rejections += rejected
    out = []
    for tokens, tiers_, ctx, budget in zip(committed, decided, ctxs, budgets):
        end = next((j + 1 for j, t in enumerate(tokens) if t in ctx.eos_ids), len(tokens))
        n = min(budget, end)  # what the loop commits: up to the budget and the end token
        for tier in tiers_[:n]:
            ctx.tiers.add(tier)
        out.append(tokens[:n])
    return out


def slim_verify(chain: Chain, seqs: list[SequenceState], prefixes: list[list[int]], blocks: list[Block], tiers: list[list[int]],
                ctxs: list[StepContext]) -> list[tuple[list[int], bool]]:
    """The slim verifier's verdict on each block, in one batched pass: the tokens it commits and
    whether it rejected one. Tier-1 rows take the drafter's own distribution (always accepted); tier-2
    rows the slim verifier's."""
    slim = chain.slim
    items = [ScoreItem(seq, prefix, block.token_ids, ctx.params) for seq, prefix, block, ctx in zip(seqs, prefixes, blocks, ctxs)]
    t0 = time.perf_counter()
    scored = slim.score(items)  # p [len(block) + 1, V] each
    seconds = time.perf_counter() - t0
    out = []
    for block, tiers_, s, ctx in zip(blocks, tiers, scored, ctxs):
        k = len(block)
        q_draft = _match_vocab(block.q_draft, s.p.shape[-1])  # [k, V]
        unchecked = torch.tensor([t == TIER_UNCHECKED for t in tiers_])  # [k]
        p_slim = s.p.clone()  # [k + 1, V]
        p_slim[:k][unchecked] = q_draft[unchecked]
        verdict = rejection_sample(block.token_ids, q_draft, p_slim, ctx.generator)
        stats = ctx.level_stats(slim.name)
        stats.time_s += seconds
        stats.num_recovered_tokens += not verdict.bonus
        tokens = verdict.tokens if not verdict.bonus else verdict.tokens[:k]  # no bonus token from the slim verifier
        stats.num_emitted_tokens += len(tokens)
        out.append((tokens, not verdict.bonus))
    return out
