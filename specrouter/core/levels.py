"""The levels of a chain, behind one small interface.

Every level can `propose` tokens (drafting for the level above). Model levels can also `score` a
block (verifying the level below): a smaller model, or the target itself with layers skipped (a
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
from specrouter.core.worker import DraftCall, DraftResult, ForwardCall, ModelWorker


@dataclass(frozen=True)
class Block:
    token_ids: list[int]
    q_draft: torch.Tensor  # [len(token_ids), V]: distribution each token was drawn from
    cross_tokenizer: str | None = None  # a drafter on another tokenizer: "text" or "intersection"
    num_drafted: int | None = None  # tokens drafted for it (a model: its forward passes; None: as many as asked)

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

    def propose(self, seq: SequenceState, ctx: list[int], n: int, params: SamplingParams, seed: int) -> Block: ...

    def score(self, seq: SequenceState, ctx: list[int], draft: list[int], params: SamplingParams) -> torch.Tensor: ...

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

    def _send(self, seq_id: str, ctx: list[int], call):
        """call(start, prefix_hash) from the longest prefix the worker shares with `ctx` (re-feeding at
        least the last context token: its logits predict the next one). A worker that lost or
        diverged from the sequence gets it again from position 0 (docs/protocol.md, rule 4)."""
        log = self._cached.setdefault(seq_id, TokenLog())
        start = min(common_prefix_len(log.tokens, ctx), len(ctx) - 1)
        try:
            return start, call(start, log.prefix_hash(start))
        except PositionGapError:
            log.truncate(0)
            return 0, call(0, log.prefix_hash(0))

    def _draft(self, seq: SequenceState, own: list[int], k: int, params: SamplingParams, seed: int, allowed: torch.Tensor | None) -> DraftResult:
        """k own tokens drafted after the context `own` (own ids), caching what the worker caches."""
        start, result = self._send(
            seq.seq_id,
            own,
            lambda start, h: self.worker.draft(seq.seq_id, seq.version, start, h, own[start:], k, params, seed, allowed,
                                               self.min_confidence),
        )
        self._cached[seq.seq_id].put(start, own[start:] + result.token_ids[:-1])
        return result

    def propose(self, seq: SequenceState, ctx: list[int], n: int, params: SamplingParams, seed: int) -> Block:
        if self.retokenizer is not None and params.greedy:
            return self._propose_text(seq, ctx, n, params, seed)
        result = self._draft(seq, self._own(ctx)[0], n, params, seed, self._allowed)
        drafted = len(result.token_ids)
        if self.vocab is None:
            return Block(result.token_ids, result.q_draft, num_drafted=drafted)
        return Block(self.vocab.tokens_to_target(result.token_ids), self.vocab.rows_to_target(result.q_draft), "intersection", drafted)

    def _propose_text(self, seq: SequenceState, ctx: list[int], n: int, params: SamplingParams, seed: int) -> Block:
        """Greedy: draft n own tokens freely after the context as the drafter's own tokenizer spells its
        text (one more if that context was cut back to heal a token), re-tokenise their text after the
        context into up to n target tokens, one-hot. The drafted own tokens stay cached until the next
        call's context rolls them back."""
        own, heal = self.retokenizer.own_context(ctx)
        result = self._draft(seq, own, n + bool(heal), params, seed, None)
        tokens = self.retokenizer.to_target(ctx, result.token_ids, n, heal)
        return Block(tokens, one_hot(tokens, self.vocab_size), "text", len(result.token_ids))

    def score(self, seq: SequenceState, ctx: list[int], draft: list[int], params: SamplingParams) -> torch.Tensor:
        """p [len(draft) + 1, V]: this model's distribution at each draft position and one past it."""
        return self._score(seq, ctx, draft, params, confident=False)[0]

    def score_confident(self, seq: SequenceState, ctx: list[int], draft: list[int], params: SamplingParams) -> tuple[torch.Tensor, list[float]]:
        """`score`, and how sure the model is of its most likely token at each row [len(draft) + 1]
        (what a greedy level emits there)."""
        return self._score(seq, ctx, draft, params, confident=True)

    def _score(self, seq: SequenceState, ctx: list[int], draft: list[int], params: SamplingParams, confident: bool):
        own, ends = self._own(ctx + draft)
        n_ctx = ends[len(ctx) - 1]  # own ids spelling the context

        def call(start: int, prefix_hash: int):
            args = (seq.seq_id, seq.version, start, prefix_hash, own[start:], len(own) - n_ctx + 1, params, self._allowed)
            return self.worker.forward_confident(*args) if confident else (self.worker.forward(*args), None)

        start, (p, top) = self._send(seq.seq_id, own[:n_ctx], call)  # p [len(own) - n_ctx + 1, V_own]: row r predicts own position n_ctx + r
        self._cached[seq.seq_id].put(start, own[start:])
        if self.vocab is None:
            return p, top
        # A draft token may take several own ids: keep the row before each one's first own id.
        rows = [ends[len(ctx) - 1 + j] - n_ctx for j in range(len(draft) + 1)]
        return self.vocab.rows_to_target(p[rows]), [top[r] for r in rows] if top is not None else None

    def score_batch(self, items: list[tuple[SequenceState, list[int], list[int], SamplingParams]]) -> list[torch.Tensor]:
        """`score(seq, ctx, draft, params)` for many sequences in one batched pass on the worker."""
        return [p for p, _ in self._score_batch(items, confident=False)]

    def score_batch_confident(self, items: list[tuple[SequenceState, list[int], list[int], SamplingParams]]) -> list[tuple[torch.Tensor, list[float]]]:
        """`score_confident` for many sequences in one batched pass on the worker."""
        return self._score_batch(items, confident=True)

    def _score_batch(self, items: list[tuple[SequenceState, list[int], list[int], SamplingParams]], confident: bool) -> list[tuple]:
        if self.vocab is not None or not hasattr(self.worker, "forward_batch"):
            # A level on its own vocabulary (ids to translate), or a worker without batched calls: one call per sequence.
            return [self._score(*item, confident=confident) for item in items]

        def call(i: int, start: int, prefix_hash: int) -> ForwardCall:
            seq, ctx, draft, params = items[i]
            return ForwardCall(seq.seq_id, seq.version, start, prefix_hash, ctx[start:] + draft, len(draft) + 1, params)

        run = self.worker.forward_batch_confident if confident else self.worker.forward_batch
        starts, out = self._send_batch([(seq.seq_id, ctx) for seq, ctx, _, _ in items], call, run)
        for (seq, ctx, draft, _), start in zip(items, starts):
            self._cached[seq.seq_id].put(start, ctx[start:] + draft)
        return out if confident else [(p, None) for p in out]

    def propose_batch(self, items: list[tuple[SequenceState, list[int], int, SamplingParams, int]]) -> list[Block]:
        """`propose(seq, ctx, n, params, seed)` for many sequences, drafting them together on the worker."""
        if self.vocab is not None or not hasattr(self.worker, "draft_batch"):
            return [self.propose(*item) for item in items]

        def call(i: int, start: int, prefix_hash: int) -> DraftCall:
            seq, ctx, n, params, seed = items[i]
            return DraftCall(seq.seq_id, seq.version, start, prefix_hash, ctx[start:], n, params, seed, self.min_confidence)

        starts, results = self._send_batch([(seq.seq_id, ctx) for seq, ctx, *_ in items], call, self.worker.draft_batch)
        for (seq, ctx, *_), start, result in zip(items, starts, results):
            self._cached[seq.seq_id].put(start, ctx[start:] + result.token_ids[:-1])
        return [Block(r.token_ids, r.q_draft, num_drafted=len(r.token_ids)) for r in results]

    def _send_batch(self, targets: list[tuple[str, list[int]]], call, run) -> tuple[list[int], list]:
        """`_send` for a batch: one run over every sequence from its longest shared prefix; the
        sequences the worker refused with a gap are resent from position 0 in a second run."""
        logs = [self._cached.setdefault(seq_id, TokenLog()) for seq_id, _ in targets]
        starts = [min(common_prefix_len(log.tokens, ctx), len(ctx) - 1) for log, (_, ctx) in zip(logs, targets)]
        results = run([call(i, start, log.prefix_hash(start)) for i, (log, start) in enumerate(zip(logs, starts))])
        gaps = [i for i, r in enumerate(results) if isinstance(r, PositionGapError)]
        for i in gaps:
            logs[i].truncate(0)
            starts[i] = 0
        for i, r in zip(gaps, run([call(i, 0, logs[i].prefix_hash(0)) for i in gaps]) if gaps else []):
            results[i] = r
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
    proposal distribution is one-hot."""

    can_verify = False
    max_block = None
    min_confidence = 0.0
    cross_tokenizer = None
    vocab = None

    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 2, name: str = "ngram"):
        self.name = name
        self.vocab_size = vocab_size
        self.max_n, self.min_n = max_n, min_n

    def lookup(self, ctx: list[int], n: int) -> list[int]:
        for size in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            pattern = ctx[-size:]
            for i in range(len(ctx) - size - 1, -1, -1):  # latest match first
                if ctx[i : i + size] == pattern:
                    return ctx[i + size : i + size + n]
        return []

    def propose(self, seq: SequenceState, ctx: list[int], n: int, params: SamplingParams, seed: int) -> Block:
        tokens = self.lookup(ctx, n)
        return Block(tokens, one_hot(tokens, self.vocab_size), num_drafted=len(tokens))

    def score(self, seq: SequenceState, ctx: list[int], draft: list[int], params: SamplingParams) -> torch.Tensor:
        raise TypeError("the n-gram drafter cannot verify; put it at the bottom of the chain")

    def release(self, seq_id: str) -> None:
        pass

    def forget(self) -> None:
        pass

    def backlog(self, seq_id: str, num_tokens: int) -> int:
        return 0  # no cache: a lookup reads the context as it is
