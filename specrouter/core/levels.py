"""The levels of a chain, behind one small interface.

Every level can `propose` tokens (drafting for the level above). Model levels can also `score` a
block (verifying the level below). Both run for a batch of sequences (a single request is a batch of
one): a smaller model, or the target itself with layers skipped (a
slim view over the same weights) are both `ModelLevel`s, and so is a model with another tokenizer
than the target's (translated through a `VocabMap`). The model-free prompt-lookup drafter only
proposes, so it sits at the bottom of a chain.

A level with another tokenizer crosses to the target's vocabulary in one of two ways, reported per
block as `cross_tokenizer`: "intersection" (restricted to the shared tokens: exact for sampling,
and always when it verifies) or "text" (greedy drafting: it drafts freely and its text is
re-tokenised into the target's tokens, specrouter/core/retokenize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specrouter.core.retokenize import Retokenizer
from specrouter.core.sampling import SamplingParams
from specrouter.core.sequence import PositionGapError, SequenceState, TokenLog, common_prefix_len
from specrouter.core.vocab import VocabMap
from specrouter.core.worker import DraftCall, DraftResult, ForwardCall, ModelWorker, Scored


@dataclass(frozen=True)
class ScoreItem:
    """One sequence's `score`: this level's distributions after `ctx` at each `draft` position and one
    past it; `confident`: also its confidence in its most likely token at each of those rows."""

    seq: SequenceState
    ctx: list[int]
    draft: list[int]
    params: SamplingParams
    confident: bool = False


@dataclass(frozen=True)
class ProposeItem:
    """One sequence's `propose`: up to n tokens after `ctx`. `plain`: the target decoding for itself
    (a decode run, specrouter/core/chain.py `decode_run`): each token drawn by position_generator(seed,
    its position) rather than by one generator seeded `seed`, and the block carries no distributions."""

    seq: SequenceState
    ctx: list[int]
    n: int
    params: SamplingParams
    seed: int
    plain: bool = False


@dataclass(frozen=True)
class Block:
    token_ids: list[int]
    q_draft: torch.Tensor  # [len(token_ids), V]: distribution each token was drawn from
    cross_tokenizer: str | None = None  # a drafter on another tokenizer: "text" or "intersection"
    num_drafted: int | None = None  # tokens drafted for it (a model: its forward passes; None: as many as asked)
    confidence: list[float] | None = None  # how sure its drafter was of each token (None: not measured; tiered verification)

    def __len__(self) -> int:
        return len(self.token_ids)


def one_hot(tokens: list[int], vocab_size: int) -> torch.Tensor:
    """[len(tokens), vocab_size]: the proposal distribution of tokens chosen deterministically."""
    q = torch.zeros(len(tokens), vocab_size)
    if tokens:
        q[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return q


class Level(Protocol):
    name: str
    vocab_size: int
    can_verify: bool
    max_block: int | None  # the longest block it verifies as bit-exactly as one-token decoding (None: any)
    min_confidence: float  # it ends its blocks after a token it gave less (0: never)
    cross_tokenizer: str | None  # how its blocks cross to the target's vocabulary (None: the target's own)
    vocab: VocabMap | None  # its tokenizer's map to the target's (None: the target's own)

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        """Each item's p [len(draft) + 1, V] (and its top confidences where asked)."""
        ...

    def propose(self, items: list[ProposeItem]) -> list[Block]: ...

    def prefill(self, items: list[tuple[SequenceState, list[int]]]) -> None:
        """Cache each (sequence, context) without scoring it: a long prompt's leading chunks."""
        ...

    def release(self, seq_id: str) -> None: ...

    def forget(self) -> None: ...

    def backlog(self, seq_id: str, num_tokens: int) -> int:
        """Tokens of a `num_tokens`-long context this level has not cached yet (what its next call must prefill)."""
        ...


class ModelLevel:
    """A model view behind a worker. Mirrors which tokens the worker has cached, per sequence, so each
    call resends only what changed and rolls the worker back exactly to the last shared position.

    With a `vocab` map the model has its own tokenizer: it is restricted to the tokens it shares with
    the target and speaks target ids outward (specrouter/core/vocab.py); the mirror holds its own ids.
    With a `retokenizer` too, it drafts greedy blocks freely and re-tokenises their text instead.
    With `min_confidence`, its drafts stop after a token it was less sure of (see ModelWorker.draft), and
    so do the blocks it passes up from the middle of a chain (specrouter/core/chain.py `propose`)."""

    can_verify = True

    def __init__(self, name: str, worker: ModelWorker, vocab: VocabMap | None = None, retokenizer: Retokenizer | None = None,
                 min_confidence: float = 0.0, bit_exact: bool = True):
        self.name = name
        self.worker = worker
        self.min_confidence = min_confidence
        self.vocab = vocab
        self.retokenizer = retokenizer if vocab else None
        self.cross_tokenizer = "intersection" if vocab else None  # how its scores cross to the target's vocabulary
        self.vocab_size = vocab.target_rows if vocab else worker.vocab_size
        # A verification pass runs the block and the token before it: a block of up to width - 1.
        self.max_block = worker.exact_width - 1 if bit_exact and worker.exact_width is not None else None
        self._allowed = vocab.allowed if vocab else None  # [V_own] bool
        self._cached: dict[str, TokenLog] = {}

    def _own(self, target_ids: list[int]) -> tuple[list[int], list[int]]:
        """Target ids -> (the worker's ids, ends[j] = own ids spelling target_ids[: j + 1])."""
        if self.vocab is None:
            return target_ids, list(range(1, len(target_ids) + 1))
        return self.vocab.to_own(target_ids)

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        """p [len(draft) + 1, V] per item: this model's distribution at each draft position and one past
        it, all items in one batched pass on the worker."""
        owns = [self._own(item.ctx + item.draft) for item in items]  # (own ids, ends)
        n_ctxs = [ends[len(item.ctx) - 1] for item, (_, ends) in zip(items, owns)]  # own ids spelling each context

        def call(b: int, start: int, prefix_hash: int) -> ForwardCall:
            item, (own, _), n_ctx = items[b], owns[b], n_ctxs[b]
            return ForwardCall(item.seq.seq_id, item.seq.version, start, prefix_hash, own[start:], len(own) - n_ctx + 1, item.params,
                               item.confident)

        targets = [(item.seq.seq_id, own[:n_ctx]) for item, (own, _), n_ctx in zip(items, owns, n_ctxs)]
        starts, results = self._send(targets, call, lambda calls: self.worker.forward(calls, self._allowed))
        scored = []
        for item, (own, ends), n_ctx, start, r in zip(items, owns, n_ctxs, starts, results):
            self._cached[item.seq.seq_id].put(start, own[start:])
            if self.vocab is None:  # r.p [len(draft) + 1, V]
                scored.append(r)
                continue
            # r.p [len(own) - n_ctx + 1, V_own]: row r predicts own position n_ctx + r. A draft token may take
            # several own ids: keep the row before each one's first own id.
            rows = [ends[len(item.ctx) - 1 + j] - n_ctx for j in range(len(item.draft) + 1)]
            scored.append(Scored(self.vocab.rows_to_target(r.p[rows]), [r.top[j] for j in rows] if r.top is not None else None))
        return scored

    def prefill(self, items: list[tuple[SequenceState, list[int]]]) -> None:
        """Cache each context (target ids) on the worker in one batched pass, asking for no distribution."""
        owns = [self._own(ctx)[0] for _, ctx in items]

        def call(b: int, start: int, prefix_hash: int) -> ForwardCall:
            seq = items[b][0]
            return ForwardCall(seq.seq_id, seq.version, start, prefix_hash, owns[b][start:], 0, SamplingParams())

        starts, _ = self._send([(seq.seq_id, own) for (seq, _), own in zip(items, owns)], call,
                               lambda calls: self.worker.forward(calls, self._allowed))
        for (seq, _), own, start in zip(items, owns, starts):
            self._cached[seq.seq_id].put(start, own[start:])

    def propose(self, items: list[ProposeItem]) -> list[Block]:
        """Up to n tokens per item, drafted together on the worker. A level on another tokenizer drafts
        among the shared tokens, or, greedy with a retokenizer, drafts freely and re-tokenises its text."""
        blocks: list[Block | None] = [None] * len(items)
        text = [b for b, item in enumerate(items) if self.retokenizer is not None and item.params.greedy]
        shared = [b for b, item in enumerate(items) if not (self.retokenizer is not None and item.params.greedy)]
        if shared:
            results = self._draft([items[b] for b in shared], [self._own(items[b].ctx)[0] for b in shared],
                                  [items[b].n for b in shared], self._allowed)
            for b, r in zip(shared, results):
                drafted = len(r.token_ids)
                blocks[b] = (Block(r.token_ids, r.q_draft, num_drafted=drafted, confidence=r.confidence) if self.vocab is None else
                             Block(self.vocab.tokens_to_target(r.token_ids), self.vocab.rows_to_target(r.q_draft), "intersection", drafted))
        if text:
            # Greedy: draft n own tokens freely after the context as the drafter's own tokenizer spells its
            # text (one more if that context was cut back to heal a token), re-tokenise their text after
            # the context into up to n target tokens, one-hot. The drafted own tokens stay cached until
            # the next call's context rolls them back.
            healed = [self.retokenizer.own_context(items[b].ctx) for b in text]  # (own ids, heal)
            results = self._draft([items[b] for b in text], [own for own, _ in healed],
                                  [items[b].n + bool(heal) for b, (_, heal) in zip(text, healed)], None)
            for b, (_, heal), r in zip(text, healed, results):
                tokens = self.retokenizer.to_target(items[b].ctx, r.token_ids, items[b].n, heal)
                blocks[b] = Block(tokens, one_hot(tokens, self.vocab_size), "text", len(r.token_ids))
        return blocks

    def _draft(self, items: list[ProposeItem], owns: list[list[int]], ks: list[int], allowed: torch.Tensor | None) -> list[DraftResult]:
        """ks[b] own tokens drafted after each context owns[b] (own ids), caching what the worker caches."""

        def call(b: int, start: int, prefix_hash: int) -> DraftCall:
            item = items[b]
            return DraftCall(item.seq.seq_id, item.seq.version, start, prefix_hash, owns[b][start:], ks[b], item.params, item.seed,
                             self.min_confidence, item.plain)

        targets = [(item.seq.seq_id, own) for item, own in zip(items, owns)]
        starts, results = self._send(targets, call, lambda calls: self.worker.draft(calls, allowed))
        for item, own, start, r in zip(items, owns, starts, results):
            self._cached[item.seq.seq_id].put(start, own[start:] + r.token_ids[:-1])
        return results

    def _send(self, targets: list[tuple[str, list[int]]], call, run) -> tuple[list[int], list]:
        """run([call(b, start, prefix_hash)]) over every sequence b from the longest prefix the worker
        shares with its context (re-feeding at least the last context token: its logits predict the next
        one). The sequences the worker refused with a gap (it lost or diverged from them) are resent
        from position 0 in a second run (docs/protocol.md, rule 4)."""
        logs = [self._cached.setdefault(seq_id, TokenLog()) for seq_id, _ in targets]
        starts = [min(common_prefix_len(log.tokens, ctx), len(ctx) - 1) for log, (_, ctx) in zip(logs, targets)]
        results = run([call(b, start, log.prefix_hash(start)) for b, (log, start) in enumerate(zip(logs, starts))])
        gaps = [b for b, r in enumerate(results) if isinstance(r, PositionGapError)]
        for b in gaps:
            logs[b].truncate(0)
            starts[b] = 0
        for b, r in zip(gaps, run([call(b, 0, logs[b].prefix_hash(0)) for b in gaps]) if gaps else []):
            results[b] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return starts, results

    def forget(self) -> None:
        """Drop every mirror (the worker restarted): the next calls prefill from position 0."""
        self._cached.clear()

    def backlog(self, seq_id: str, num_tokens: int) -> int:
        log = self._cached.get(seq_id)
        return max(0, num_tokens - (len(log) if log is not None else 0))  # in target tokens (own ids: close enough)

    def release(self, seq_id: str) -> None:
        self._cached.pop(seq_id, None)
        self.worker.release(seq_id)


class NgramLevel:
    """Prompt-lookup drafting: find the latest earlier occurrence of the context's last n tokens
    (n from max_n down to min_n) and propose the tokens that followed it. Deterministic, so its
    proposal distribution is one-hot. A longer `min_n` drafts less often and is right more often:
    a match of 8 tokens in an answer that repeats its prompt continues for dozens, one of 2 often
    for none, which pays only where a wide pass costs little more than a narrow one."""

    can_verify = False
    max_block = None
    min_confidence = 0.0
    cross_tokenizer = None
    vocab = None

    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 2, name: str = "ngram"):
        self.name = name
        self.vocab_size = vocab_size
        self.max_n, self.min_n = max(max_n, min_n), min_n  # a long minimum is looked up at its own length

    def lookup(self, ctx: list[int], n: int) -> list[int]:
        for size in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            pattern = ctx[-size:]
            for i in range(len(ctx) - size - 1, -1, -1):  # latest match first
                if ctx[i : i + size] == pattern:
                    return ctx[i + size : i + size + n]
        return []

    def propose(self, items: list[ProposeItem]) -> list[Block]:
        blocks = []
        for item in items:
            tokens = self.lookup(item.ctx, item.n)
            blocks.append(Block(tokens, one_hot(tokens, self.vocab_size), num_drafted=len(tokens)))
        return blocks

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        raise TypeError("the n-gram drafter cannot verify; put it at the bottom of the chain")

    def prefill(self, items: list[tuple[SequenceState, list[int]]]) -> None:
        pass  # no cache: a lookup reads the context as it is

    def release(self, seq_id: str) -> None:
        pass

    def forget(self) -> None:
        pass

    def backlog(self, seq_id: str, num_tokens: int) -> int:
        return 0  # no cache: a lookup reads the context as it is
