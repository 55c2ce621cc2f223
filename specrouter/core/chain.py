"""The multi-level speculative step.

A chain is a list of levels M_0 -> M_1 -> ... -> M_N (the target). Level i proposes tokens to level
i+1 by running its own verification rounds over the tokens level i-1 proposes; every token a level
emits is distributed exactly as that level's model given its prefix, so the level passes its own
probabilities upward as the proposal distribution q_draft (TriForce's rule). Only the target's
verdict is committed, so the output is distributed exactly as the target alone (greedy: identical).
Every level speaks the target's token ids (a level on another tokenizer translates: specrouter/core/vocab.py,
or, drafting greedy blocks, re-tokenises its text: specrouter/core/retokenize.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specrouter.routing.acceptance import pairwise_alpha
from specrouter.core.levels import Block, Level
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import SequenceState
from specrouter.core.verification import Verdict, rejection_sample


@dataclass
class LevelStats:
    """Per-level counters for one request. A level's draft counters describe the blocks it proposed to
    the level above; its recovered / bonus counters describe the verdicts it gave the level below."""

    name: str
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_rounds: int = 0  # verification rounds of this level's proposals
    num_recovered_tokens: int = 0
    num_bonus_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens this level emitted as a verifier
    time_s: float = 0.0
    vocab_map: dict | None = None  # a level with another tokenizer than the target's: its VocabMap report
    cross_tokenizer: str | None = None  # how its blocks crossed to the target's tokenizer: "text", "intersection"

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens the level above emits per verification of this level's block (accepted + 1)."""
        return (self.num_accepted_tokens + self.num_rounds) / self.num_rounds if self.num_rounds else 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_rounds": self.num_rounds,
            "num_recovered_tokens": self.num_recovered_tokens,
            "num_bonus_tokens": self.num_bonus_tokens,
            "num_emitted_tokens": self.num_emitted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "time_s": round(self.time_s, 4),
            **({"vocab_map": self.vocab_map} if self.vocab_map is not None else {}),
            **({"cross_tokenizer": self.cross_tokenizer} if self.cross_tokenizer is not None else {}),
        }

    def note_cross_tokenizer(self, mode: str) -> None:
        """Record the mode of a block it proposed ("intersection+text" if a request saw both)."""
        modes = set(self.cross_tokenizer.split("+")) if self.cross_tokenizer else set()
        self.cross_tokenizer = "+".join(sorted(modes | {mode}))


@dataclass
class Chain:
    levels: list[Level]  # bottom drafter first, target last
    draft_lens: list[int]  # draft_lens[i]: block length level i proposes to level i+1

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
        return Chain(self.levels[:i] + self.levels[i + 1 :], lens)


@dataclass(frozen=True)
class VerifyRecord:
    """One verification of a block: the feedback the router learns acceptance from."""

    drafter: str
    verifier: str
    num_draft_tokens: int
    num_accepted_tokens: int
    alphas: list[float]  # sum_x min(q_draft, p_target) at each draft position up to the first rejection
    num_asked: int | None = None  # the block length asked for (None: num_draft_tokens); a drafter may give fewer
    replayed: bool = False  # a shadow replay over committed tokens (specrouter/core/shadow.py), not a verification run


@dataclass(frozen=True)
class TimingRecord:
    """One level call as the chain saw it: the feedback the router learns costs from."""

    level: str
    op: str  # "score" (one pass over num_tokens), "draft" (num_tokens sampled one by one) or "prefill" (a
    # drafter catching up on context it had not cached, then drafting: neither a drafting cost nor overhead)
    num_tokens: int  # tokens the pass ran per sequence: its uncached context and the block (the longest in a batch)
    seconds: float
    batch: int = 1  # sequences in the call
    asked: int | None = None  # "draft": the tokens asked for (num_tokens: those drafted, fewer where it stopped unsure)


CATCH_UP = 8  # a drafter that must first cache more context than this is catching up: its time is no drafting cost


def tokens_run(level: Level, seq: SequenceState, prefix: list[int], block_len: int) -> int:
    """Tokens a level's pass over `prefix` + a block really runs: the context it has not cached (at
    least the last token) and the block. A request's first pass is a prefill, not a block of 1."""
    return max(1, level.backlog(seq.seq_id, len(prefix))) + block_len


@dataclass
class StepContext:
    """What one request's steps share: sampling, randomness, end tokens, statistics and feedback."""

    params: SamplingParams
    generator: torch.Generator
    eos_ids: frozenset[int]
    stats: dict[str, LevelStats] = field(default_factory=dict)
    records: list[VerifyRecord | TimingRecord] = field(default_factory=list)

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def level_stats(self, name: str) -> LevelStats:
        if name not in self.stats:
            self.stats[name] = LevelStats(name)
        return self.stats[name]

    def drain_records(self) -> list[VerifyRecord | TimingRecord]:
        records, self.records = self.records, []
        return records


def speculative_step(chain: Chain, seq: SequenceState, ctx: StepContext, budget: int) -> list[int]:
    """One target verification; returns the committed tokens (at least one, at most `budget`)."""
    top = len(chain.levels) - 1
    k = top_block_lens(chain, [budget], None)[0]
    return verify_round(chain, top, seq, list(seq.token_ids), k, ctx).tokens[:budget]


def verify_round(chain: Chain, i: int, seq: SequenceState, prefix: list[int], k: int, ctx: StepContext) -> Verdict:
    """Level i verifies a block of up to k tokens that level i-1 proposes after `prefix`."""
    return _verify(chain, i, seq, prefix, k, ctx, confident=False)[0]


def _verify(chain: Chain, i: int, seq: SequenceState, prefix: list[int], k: int, ctx: StepContext,
            confident: bool) -> tuple[Verdict, list[float] | None]:
    """`verify_round`; `confident` (greedy): also level i's confidence in its most likely token at each
    row [len(block) + 1], which is the token it emits there."""
    level = chain.levels[i]
    if i > 0 and k > 0:
        block = propose(chain, i - 1, seq, prefix, k, ctx)
    else:
        block = Block([], torch.empty(0, level.vocab_size))
    fed = tokens_run(level, seq, prefix, len(block))
    t0 = time.perf_counter()
    if confident and ctx.params.greedy:
        p_target, top = level.score_confident(seq, prefix, block.token_ids, ctx.params)  # [len(block) + 1, V], [len(block) + 1]
    else:
        p_target, top = level.score(seq, prefix, block.token_ids, ctx.params), None
    seconds = time.perf_counter() - t0
    ctx.records.append(TimingRecord(level.name, "score", fed, seconds))
    return judge(chain, i, block, p_target, seconds, ctx, k), top


def sure_prefix(verdict: Verdict, top: list[float] | None, min_confidence: float) -> int | None:
    """Where a level that ends its blocks unsure stops passing a verdict up: after the first emitted
    token it gave less than `min_confidence` (greedy: `top`, its confidence in its most likely token,
    which it emits; sampling: its probability of the token drawn); None if it was sure of them all.
    Its tokens are distributed as its own, and the stop depends only on them, as when it drafts
    (ModelWorker.draft), so the block it proposes stays an exact proposal."""
    n = len(verdict.tokens)
    sure = top[:n] if top is not None else verdict.p_rows[torch.arange(n), torch.tensor(verdict.tokens)].tolist()
    return next((j + 1 for j, c in enumerate(sure) if c < min_confidence), None)


def judge(chain: Chain, i: int, block: Block, p_target: torch.Tensor, seconds: float, ctx: StepContext, asked: int = 0) -> Verdict:
    """Level i's verdict on `block` (asked for `asked` tokens) from its distributions p_target
    [len(block) + 1, V]; counts it. A block shorter than asked (an n-gram without a match, a drafter
    that stopped unsure) is recorded too: the positions it left out emit no more than a rejection."""
    stats = ctx.level_stats(chain.levels[i].name)
    q_draft = _match_vocab(block.q_draft, p_target.shape[-1])  # [len(block), V]
    verdict = rejection_sample(block.token_ids, q_draft, p_target, ctx.generator)
    stats.time_s += seconds
    stats.num_emitted_tokens += len(verdict.tokens)
    stats.num_bonus_tokens += verdict.bonus
    stats.num_recovered_tokens += not verdict.bonus
    if i > 0 and block.cross_tokenizer:
        ctx.level_stats(chain.levels[i - 1].name).note_cross_tokenizer(block.cross_tokenizer)
    if len(block):
        below = ctx.level_stats(chain.levels[i - 1].name)
        below.num_draft_tokens += len(block)
        below.num_accepted_tokens += verdict.num_accepted
        below.num_rounds += 1
    if len(block) or asked:
        # Acceptance where the verifier judged: past the first rejection the block's prefix is one it
        # turned down, where agreement is lower and never used (alpha is P(accepted | prefix accepted)).
        judged = min(len(block), verdict.num_accepted + 1)
        alphas = pairwise_alpha(q_draft[:judged], p_target[:judged]).tolist()
        ctx.records.append(VerifyRecord(chain.levels[i - 1].name, chain.levels[i].name, len(block), verdict.num_accepted, alphas,
                                        max(asked, len(block))))
    return verdict


def propose(chain: Chain, i: int, seq: SequenceState, prefix: list[int], n: int, ctx: StepContext) -> Block:
    """Level i proposes up to n tokens after `prefix`, each with the distribution it was drawn from."""
    if i == 0:
        level = chain.levels[0]
        catching_up = level.backlog(seq.seq_id, len(prefix)) > CATCH_UP
        t0 = time.perf_counter()
        block = level.propose(seq, prefix, n, ctx.params, ctx.seed())
        seconds = time.perf_counter() - t0
        ctx.level_stats(level.name).time_s += seconds
        ctx.records.append(TimingRecord(level.name, "prefill" if catching_up else "draft", drafted(block, n), seconds, asked=n))
        return block
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    min_confidence = getattr(chain.levels[i], "min_confidence", 0.0)  # it ends its blocks unsure, here too
    while len(tokens) < n:
        k = min(chain.draft_lens[i - 1], n - len(tokens) - 1)
        verdict, top = _verify(chain, i, seq, prefix + tokens, k, ctx, confident=min_confidence > 0)
        stop = sure_prefix(verdict, top, min_confidence) if min_confidence else None
        tokens += verdict.tokens[:stop]
        rows.append(verdict.p_rows[:stop])
        if stop is not None or ctx.eos_ids.intersection(verdict.tokens[:stop]):
            break  # drafting past the end is wasted work (stopping early keeps the proposal exact)
    return Block(tokens[:n], torch.cat(rows)[:n], getattr(chain.levels[i], "cross_tokenizer", None))


def drafted(block: Block, n: int) -> int:
    """Tokens a bottom drafter drafted for `block` when asked for n (fewer where it stopped unsure)."""
    return block.num_drafted if block.num_drafted is not None else n


def _match_vocab(q_draft: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pad a drafter's rows [k, V_d] to the verifier's vocabulary size (same tokenizer, larger padded head)."""
    if q_draft.shape[-1] == vocab:
        return q_draft
    return torch.nn.functional.pad(q_draft, (0, vocab - q_draft.shape[-1]))


# -- the same step for a batch of sequences, level by level in lockstep ------------------------------------
# Every level call of the step above becomes one batched call over the sequences that make it; each
# sequence's own operations (and its generator's draws) happen in the same order as alone, and the
# verdicts come from the same `judge`. Level calls are timed per batch into `timings`.


def speculative_step_batch(
    chain: Chain, seqs: list[SequenceState], ctxs: list[StepContext], budgets: list[int], timings: list[TimingRecord],
    top_lens: list[int] | None = None,
) -> list[list[int]]:
    """One batched target verification for every sequence; the committed tokens of each.
    `top_lens`: each sequence's own draft length for the target (default: the chain's)."""
    top = len(chain.levels) - 1
    ks = top_block_lens(chain, budgets, top_lens)
    verdicts = verify_round_batch(chain, top, seqs, [list(seq.token_ids) for seq in seqs], ks, ctxs, timings)
    return [verdict.tokens[:budget] for verdict, budget in zip(verdicts, budgets)]


def top_block_lens(chain: Chain, budgets: list[int], top_lens: list[int] | None) -> list[int]:
    """Each sequence's block length for the target: its own (or the chain's), leaving room for one target
    token, and no longer than the target verifies bit-exactly (its `max_block`)."""
    if len(chain.levels) == 1:
        return [0] * len(budgets)
    lens = top_lens if top_lens is not None else [chain.draft_lens[-1]] * len(budgets)
    cap = chain.levels[-1].max_block
    return [min(g, budget - 1, g if cap is None else cap) for g, budget in zip(lens, budgets)]


def score_many(level: Level, items: list[tuple[SequenceState, list[int], list[int], SamplingParams]]) -> list[torch.Tensor]:
    """`level.score(*item)` for every item, in one batched pass where the level has one."""
    score_batch = getattr(level, "score_batch", None)
    return score_batch(items) if score_batch else [level.score(*item) for item in items]


def score_many_confident(level: Level, items: list[tuple[SequenceState, list[int], list[int], SamplingParams]]) -> list[tuple[torch.Tensor, list[float]]]:
    """`level.score_confident(*item)` for every item, in one batched pass where the level has one."""
    score_batch = getattr(level, "score_batch_confident", None)
    return score_batch(items) if score_batch else [level.score_confident(*item) for item in items]


def verify_round_batch(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ks: list[int],
                       ctxs: list[StepContext], timings: list[TimingRecord]) -> list[Verdict]:
    """`verify_round` for many sequences: one batched proposal below, one batched pass at level i."""
    return _verify_batch(chain, i, seqs, prefixes, ks, ctxs, timings, confident=False)[0]


def _verify_batch(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ks: list[int],
                  ctxs: list[StepContext], timings: list[TimingRecord], confident: bool) -> tuple[list[Verdict], list[list[float] | None]]:
    """`verify_round_batch`, and with `confident` each greedy sequence's confidences as in `_verify`."""
    level = chain.levels[i]
    blocks = [Block([], torch.empty(0, level.vocab_size))] * len(seqs)
    drafting = [b for b, k in enumerate(ks) if i > 0 and k > 0]
    if drafting:
        proposed = propose_batch(chain, i - 1, [seqs[b] for b in drafting], [prefixes[b] for b in drafting],
                                 [ks[b] for b in drafting], [ctxs[b] for b in drafting], timings)
        for b, block in zip(drafting, proposed):
            blocks[b] = block
    items = [(seq, prefix, block.token_ids, ctx.params) for seq, prefix, block, ctx in zip(seqs, prefixes, blocks, ctxs)]
    fed = max(tokens_run(level, seq, prefix, len(block)) for seq, prefix, block in zip(seqs, prefixes, blocks))
    t0 = time.perf_counter()
    if confident:  # [len(block) + 1, V] and [len(block) + 1] each
        scored = [(p, top if ctx.params.greedy else None) for (p, top), ctx in zip(score_many_confident(level, items), ctxs)]
    else:
        scored = [(p, None) for p in score_many(level, items)]  # [len(block) + 1, V] each
    seconds = time.perf_counter() - t0
    timings.append(TimingRecord(level.name, "score", fed, seconds, len(seqs)))
    verdicts = [judge(chain, i, block, p, seconds, ctx, k) for block, (p, _), ctx, k in zip(blocks, scored, ctxs, ks)]
    return verdicts, [top for _, top in scored]


def propose_batch(chain: Chain, i: int, seqs: list[SequenceState], prefixes: list[list[int]], ns: list[int],
                  ctxs: list[StepContext], timings: list[TimingRecord]) -> list[Block]:
    """`propose` for many sequences: an intermediate level runs batched rounds until every sequence
    has its n tokens (or an end token); a sequence leaves the rounds once it has them."""
    if i == 0:
        level = chain.levels[0]
        items = [(seq, prefix, n, ctx.params, ctx.seed()) for seq, prefix, n, ctx in zip(seqs, prefixes, ns, ctxs)]
        catching_up = any(level.backlog(seq.seq_id, len(prefix)) > CATCH_UP for seq, prefix in zip(seqs, prefixes))
        t0 = time.perf_counter()
        propose_many = getattr(level, "propose_batch", None)
        blocks = propose_many(items) if propose_many else [level.propose(*item) for item in items]
        seconds = time.perf_counter() - t0
        for ctx in ctxs:
            ctx.level_stats(level.name).time_s += seconds
        timings.append(TimingRecord(level.name, "prefill" if catching_up else "draft", max(drafted(b, n) for b, n in zip(blocks, ns)),
                                    seconds, len(seqs), max(ns)))
        return blocks
    tokens: list[list[int]] = [[] for _ in seqs]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    min_confidence = getattr(chain.levels[i], "min_confidence", 0.0)  # it ends its blocks unsure, here too
    open_ = list(range(len(seqs)))
    while open_:
        ks = [min(chain.draft_lens[i - 1], ns[b] - len(tokens[b]) - 1) for b in open_]
        verdicts, tops = _verify_batch(chain, i, [seqs[b] for b in open_], [prefixes[b] + tokens[b] for b in open_], ks,
                                       [ctxs[b] for b in open_], timings, confident=min_confidence > 0)
        still = []
        for b, verdict, top in zip(open_, verdicts, tops):
            stop = sure_prefix(verdict, top, min_confidence) if min_confidence else None
            tokens[b] += verdict.tokens[:stop]
            rows[b].append(verdict.p_rows[:stop])
            if stop is None and len(tokens[b]) < ns[b] and not ctxs[b].eos_ids.intersection(verdict.tokens):
                still.append(b)
        open_ = still
    mode = getattr(chain.levels[i], "cross_tokenizer", None)
    return [Block(t[:n], torch.cat(r)[:n], mode) for t, r, n in zip(tokens, rows, ns)]
