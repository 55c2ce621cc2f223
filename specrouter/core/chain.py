"""The multi-level speculative step.

A chain is a list of levels M_0 -> M_1 -> ... -> M_N (the target). Level i proposes tokens to level
i+1 by running its own verification rounds over the tokens level i-1 proposes; every token a level
emits is distributed exactly as that level's model given its prefix, so the level passes its own
probabilities upward as the proposal distribution q_draft (TriForce's rule). Only the target's
verdict is committed, so the output is distributed exactly as the target alone (greedy: identical).
Every level speaks the target's token ids (a level on another tokenizer translates: specrouter/core/vocab.py,
or, drafting greedy blocks, re-tokenises its text: specrouter/core/retokenize.py).

Every call runs for a batch of sequences, level by level in lockstep (a single request is a batch of
one): each level call is one batched call over the sequences that make it, and each sequence's own
operations (and its generator's draws) happen in the same order whatever the batch. Level calls are
timed per batch into `timings`; each request's statistics and verdict records go to its StepContext
(specrouter/core/records.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specrouter.core.levels import Block, Level, ProposeItem, ScoreItem
from specrouter.core.records import LevelStats, TimingRecord, VerifyRecord, level_stats, record_verdict
from specrouter.core.sampling import SamplingParams, position_generator
from specrouter.core.sequence import SequenceState
from specrouter.core.tiers import Thresholds, TierCounts
from specrouter.core.verification import Verdict, rejection_sample


@dataclass
class Chain:
    levels: list[Level]  # bottom drafter first, target last
    draft_lens: list[int]  # draft_lens[i]: block length level i proposes to level i+1
    slim: Level | None = None  # the slim verifier of tiered verification (specrouter/core/tiered.py); no level of the chain

    def __post_init__(self):
        if len(self.draft_lens) != len(self.levels) - 1:
            raise ValueError(f"need {len(self.levels) - 1} draft lengths, got {self.draft_lens}")
        if any(k < 1 for k in self.draft_lens):
            raise ValueError(f"draft lengths must be >= 1, got {self.draft_lens}")
        for below, level in zip(self.levels, self.levels[1:]):
            if not level.can_verify:
                raise ValueError(f"{level.name} cannot verify: it may only be the first (bottom) level")
            if below.vocab_size > level.vocab_size:
                raise ValueError(f"{below.name} has a larger vocabulary than its verifier {level.name}")

    @property
    def names(self) -> list[str]:
        return [level.name for level in self.levels]

    def without(self, name: str) -> "Chain":
        """The chain with a drafter removed; the level below it inherits its block length."""
        i = self.names.index(name)
        if i == len(self.levels) - 1:
            raise ValueError("the target cannot be removed from its chain")
        lens = self.draft_lens[: max(i - 1, 0)] + self.draft_lens[max(i - 1, 0) + 1 :]
        return Chain(self.levels[:i] + self.levels[i + 1 :], lens, self.slim)


CATCH_UP = 8  # a drafter that must first cache more context than this is catching up: its time is no drafting cost


@dataclass
class StepContext:
    """What one request's steps share: sampling, randomness, end tokens, statistics and feedback."""

    params: SamplingParams
    generator: torch.Generator
    eos_ids: frozenset[int]
    stats: dict[str, LevelStats] = field(default_factory=dict)
    records: list[VerifyRecord | TimingRecord] = field(default_factory=list)
    tiered: Thresholds | None = None  # opt-in lossy tiered verification (specrouter/core/tiered.py); None: lossless
    tiers: TierCounts = field(default_factory=TierCounts)  # with `tiered`: the committed tokens each tier decided

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    @property
    def plain_seed(self) -> int:
        """The request's own seed (its generator's): with a position, it seeds each plain target token's draw."""
        return self.generator.initial_seed()

    def level_stats(self, name: str) -> LevelStats:
        return level_stats(self.stats, name)

    def drain_records(self) -> list[VerifyRecord | TimingRecord]:
        records, self.records = self.records, []
        return records


def speculative_step(chain: Chain, seqs: list[SequenceState], ctxs: list[StepContext], budgets: list[int],
                     timings: list[TimingRecord], top_lens: list[int] | None = None) -> list[list[int]]:
    """One target verification for every sequence; the committed tokens of each (at least one, at most
    its budget). `top_lens`: each sequence's own draft length for the target (default: the chain's)."""
    top = len(chain.levels) - 1
    ks = top_block_lens(chain, seqs, budgets, top_lens)
    verdicts, _ = verify_round(chain, top, seqs, [list(seq.token_ids) for seq in seqs], ks, ctxs, timings)
    return [verdict.tokens[:budget] for verdict, budget in zip(verdicts, budgets)]


def verify_round(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ks: list[int],
                 ctxs: list[StepContext], timings: list[TimingRecord]) -> tuple[list[Verdict], list[list[float] | None]]:
    """Level i verifies, for every sequence, a block of up to k tokens that level i-1 proposes after its
    prefix. Returns each verdict and, where level i passes its tokens up and ends its blocks unsure
    (greedy), its confidence in its most likely token at each row [len(block) + 1]: the token it emits."""
    blocks = propose_blocks(chain, i, seqs, prefixes, ks, ctxs, timings)
    return score_blocks(chain, i, seqs, prefixes, blocks, ks, ctxs, timings)


def decode_run(target: Level, seqs: list[SequenceState], ctxs: list[StepContext], budgets: list[int], steps: int,
               timings: list[TimingRecord]) -> list[list[int]]:
    """Plain decoding, up to `steps` tokens per sequence (and its budget) in one call to the target: it
    drafts them itself, one batched one-token pass per token, the very passes as many plain steps would
    run, each token drawn by its position's generator as a plain step draws it (`judge`), so every token
    is the one plain steps would give and nothing is left to verify. A sequence's prompt must be cached
    (its first step prefills it). Timed as that many one-token passes."""
    ns = [min(steps, budget) for budget in budgets]
    items = [ProposeItem(seq, list(seq.token_ids), n, ctx.params, ctx.plain_seed, plain=True)
             for seq, n, ctx in zip(seqs, ns, ctxs)]
    t0 = time.perf_counter()
    blocks = target.propose(items)
    seconds = time.perf_counter() - t0
    passes = max(ns)
    timings.extend(TimingRecord(target.name, "score", 1, seconds / passes, len(seqs)) for _ in range(passes))
    for ctx, block in zip(ctxs, blocks):
        stats = ctx.level_stats(target.name)
        stats.time_s += seconds
        stats.num_emitted_tokens += len(block)
        stats.num_bonus_tokens += len(block)  # as a plain step counts its one token: nothing drafted, all bonus
    return [block.token_ids for block in blocks]


def propose_blocks(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ks: list[int],
                   ctxs: list[StepContext], timings: list[TimingRecord]) -> list[Block]:
    """The blocks level i - 1 proposes for level i to verify, in one batched call (empty where k = 0)."""
    blocks = [Block([], torch.empty(0, chain.levels[i].vocab_size))] * len(seqs)
    drafting = [b for b, k in enumerate(ks) if i > 0 and k > 0]
    if drafting:
        proposed = propose(chain, i - 1, [seqs[b] for b in drafting], [prefixes[b] for b in drafting], [ks[b] for b in drafting],
                           [ctxs[b] for b in drafting], timings)
        for b, block in zip(drafting, proposed):
            blocks[b] = block
    return blocks


def score_blocks(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], blocks: list[Block], ks: list[int],
                 ctxs: list[StepContext], timings: list[TimingRecord]) -> tuple[list[Verdict], list[list[float] | None]]:
    """Level i scores every block in one batched pass and gives its verdicts, as `verify_round`."""
    level = chain.levels[i]
    confident = i < len(chain.levels) - 1 and level.min_confidence > 0
    items = [ScoreItem(seq, prefix, block.token_ids, ctx.params, confident and ctx.params.greedy)
             for seq, prefix, block, ctx in zip(seqs, prefixes, blocks, ctxs)]
    fed = max(tokens_run(level, seq, prefix, len(block)) for seq, prefix, block in zip(seqs, prefixes, blocks))
    t0 = time.perf_counter()
    scored = level.score(items)  # p [len(block) + 1, V] each
    seconds = time.perf_counter() - t0
    timings.append(TimingRecord(level.name, "score", fed, seconds, len(seqs)))
    verdicts = [judge(chain, i, block, s.p, seconds, ctx, k, len(prefix)) for block, s, ctx, k, prefix
                in zip(blocks, scored, ctxs, ks, prefixes)]
    return verdicts, [s.top for s in scored]


def propose(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ns: list[int],
            ctxs: list[StepContext], timings: list[TimingRecord]) -> list[Block]:
    """Level i proposes up to n tokens after each prefix, each with the distribution it was drawn from.
    The bottom level drafts them; a level above runs its own verification rounds over the level below
    until each sequence has its n tokens (or an end token, or a token it was unsure of: it ends its
    blocks unsure here too), a sequence leaving the rounds once it has them."""
    level = chain.levels[i]
    if i == 0:
        return draft(level, seqs, prefixes, ns, ctxs, timings)
    tokens: list[list[int]] = [[] for _ in seqs]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    open_ = list(range(len(seqs)))
    while open_:
        ks = [min(chain.draft_lens[i - 1], ns[b] - len(tokens[b]) - 1) for b in open_]
        verdicts, tops = verify_round(chain, i, [seqs[b] for b in open_], [prefixes[b] + tokens[b] for b in open_], ks,
                                      [ctxs[b] for b in open_], timings)
        still = []
        for b, verdict, top in zip(open_, verdicts, tops):
            stop = sure_prefix(verdict, top, level.min_confidence) if level.min_confidence else None
            tokens[b] += verdict.tokens[:stop]
            rows[b].append(verdict.p_rows[:stop])
            if stop is None and len(tokens[b]) < ns[b] and not ctxs[b].eos_ids.intersection(verdict.tokens):
                still.append(b)  # drafting past the end is wasted work (stopping early keeps the proposal exact)
        open_ = still
    return [Block(t[:n], torch.cat(r)[:n], level.cross_tokenizer) for t, r, n in zip(tokens, rows, ns)]


def judge(chain: Chain, i: int, block: Block, p_target: torch.Tensor, seconds: float, ctx: StepContext, asked: int,
          position: int) -> Verdict:
    """Level i's verdict on `block` (asked for `asked` tokens, its first at `position`) from its
    distributions p_target [len(block) + 1, V], recorded into the request's statistics and records.
    The target's token after an empty block is plain decoding: drawn by the position's own generator,
    as a decode run draws it on the worker (`decode_run`)."""
    q_draft = _match_vocab(block.q_draft, p_target.shape[-1])  # [len(block), V]
    plain = not len(block) and i == len(chain.levels) - 1
    generator = position_generator(ctx.plain_seed, position) if plain else ctx.generator
    verdict = rejection_sample(block.token_ids, q_draft, p_target, generator)
    drafter = chain.levels[i - 1].name if i > 0 else None
    record_verdict(ctx.stats, ctx.records, drafter, chain.levels[i].name, block, q_draft, p_target, verdict, seconds, asked)
    return verdict


def draft(level: Level, seqs: list[SequenceState], prefixes: list[list[int]], ns: list[int], ctxs: list[StepContext],
          timings: list[TimingRecord]) -> list[Block]:
    """The bottom level drafts up to n tokens after each prefix, in one batched call, timed."""
    items = [ProposeItem(seq, prefix, n, ctx.params, ctx.seed()) for seq, prefix, n, ctx in zip(seqs, prefixes, ns, ctxs)]
    backlogs = [level.backlog(seq.seq_id, len(prefix)) for seq, prefix in zip(seqs, prefixes)]
    catching_up = max(backlogs) > CATCH_UP
    t0 = time.perf_counter()
    blocks = level.propose(items)
    seconds = time.perf_counter() - t0
    for ctx in ctxs:
        ctx.level_stats(level.name).time_s += seconds
    timings.append(TimingRecord(level.name, "prefill" if catching_up else "draft", max(drafted(b, n) for b, n in zip(blocks, ns)),
                                seconds, len(seqs), max(ns), sum(backlogs) if catching_up else 0))
    return blocks


def top_block_lens(chain: Chain, seqs: list[SequenceState], budgets: list[int], top_lens: list[int] | None) -> list[int]:
    """Each sequence's block length for the target: its own (or the chain's), leaving room for one target
    token, and no longer than the target verifies bit-exactly (its `max_block`). A target with a
    `max_block` drafts nothing into a pass that also prefills context (a prompt): that context's rows
    round by the pass's row count (llama.cpp tiles rows in fours), so drafted rows beside them would
    give its cache other bits than the target alone's prefill gives."""
    if len(chain.levels) == 1:
        return [0] * len(budgets)
    lens = top_lens if top_lens is not None else [chain.draft_lens[-1]] * len(budgets)
    target = chain.levels[-1]
    cap = target.max_block
    if cap is None:
        return [min(g, budget - 1) for g, budget in zip(lens, budgets)]
    return [0 if target.backlog(seq.seq_id, len(seq.token_ids)) > 1 else min(g, budget - 1, cap)
            for seq, g, budget in zip(seqs, lens, budgets)]


def sure_prefix(verdict: Verdict, top: list[float] | None, min_confidence: float) -> int | None:
    """Where a level that ends its blocks unsure stops passing a verdict up: after the first emitted
    token it gave less than `min_confidence` (greedy: `top`, its confidence in its most likely token,
    which it emits; sampling: its probability of the token drawn); None if it was sure of them all.
    Its tokens are distributed as its own, and the stop depends only on them, as when it drafts
    (ModelWorker.draft), so the block it proposes stays an exact proposal."""
    n = len(verdict.tokens)
    sure = top[:n] if top is not None else verdict.p_rows[torch.arange(n), torch.tensor(verdict.tokens)].tolist()
    return next((j + 1 for j, c in enumerate(sure) if c < min_confidence), None)


def tokens_run(level: Level, seq: SequenceState, prefix: list[int], block_len: int) -> int:
    """Tokens a level's pass over `prefix` + a block really runs: the context it has not cached (at
    least the last token) and the block. A request's first pass is a prefill, not a block of 1."""
    return max(1, level.backlog(seq.seq_id, len(prefix))) + block_len


def drafted(block: Block, n: int) -> int:
    """Tokens a bottom drafter drafted for `block` when asked for n (fewer where it stopped unsure)."""
    return block.num_drafted if block.num_drafted is not None else n


def _match_vocab(q_draft: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pad a drafter's rows [k, V_d] to the verifier's vocabulary size (same tokenizer, larger padded head)."""
    if q_draft.shape[-1] == vocab:
        return q_draft
    return torch.nn.functional.pad(q_draft, (0, vocab - q_draft.shape[-1]))
