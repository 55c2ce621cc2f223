"""What a speculative step reports: per-level statistics for the response, and the records the
router learns from (a verdict's acceptance, a level call's cost).

`record_verdict` is the bookkeeping of one verification (specrouter/core/chain.py `judge`): the
verifier's emitted / recovered / bonus counts, the drafter's draft / accepted counts, and a
VerifyRecord with the acceptance the verifier measured, sum_x min(q_draft, p_target) per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrouter.core.levels import Block
from specrouter.core.verification import Verdict, pairwise_alpha


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
    # where the drafter reported confidences (specrouter/core/tiers.py), at every drafted position: its
    # confidence, and whether the token was the verifier's most likely one there (given the drafted prefix)
    confidence: list[float] | None = None
    agreed: list[bool] | None = None


@dataclass(frozen=True)
class TimingRecord:
    """One level call as the chain saw it: the feedback the router learns costs from."""

    level: str
    op: str  # "score" (one pass over num_tokens), "draft" (num_tokens sampled one by one) or "prefill" (a
    # drafter catching up on `context` tokens it had not cached, then drafting num_tokens: a prefill cost)
    num_tokens: int  # tokens the pass ran per sequence: its uncached context and the block (the longest in a batch)
    seconds: float
    batch: int = 1  # sequences in the call
    asked: int | None = None  # "draft": the tokens asked for (num_tokens: those drafted, fewer where it stopped unsure)
    context: int = 0  # "prefill": the context tokens it cached before drafting, all sequences together


def level_stats(stats: dict[str, LevelStats], name: str) -> LevelStats:
    if name not in stats:
        stats[name] = LevelStats(name)
    return stats[name]


def record_verdict(stats: dict[str, LevelStats], records: list, drafter: str | None, verifier: str, block: Block,
                   q_draft: torch.Tensor, p_target: torch.Tensor, verdict: Verdict, seconds: float, asked: int) -> None:
    """Count `verifier`'s verdict on `drafter`'s block (q_draft [len(block), V], p_target [len(block) + 1, V];
    `asked`: the block length asked for) into `stats` and append its VerifyRecord to `records`. A block
    shorter than asked (an n-gram without a match, a drafter that stopped unsure) is recorded too: the
    positions it left out emit no more than a rejection."""
    judge = level_stats(stats, verifier)
    judge.time_s += seconds
    judge.num_emitted_tokens += len(verdict.tokens)
    judge.num_bonus_tokens += verdict.bonus
    judge.num_recovered_tokens += not verdict.bonus
    if drafter is None:
        return
    below = level_stats(stats, drafter)
    if block.cross_tokenizer:
        below.note_cross_tokenizer(block.cross_tokenizer)
    if len(block):
        below.num_draft_tokens += len(block)
        below.num_accepted_tokens += verdict.num_accepted
        below.num_rounds += 1
    if len(block) or asked:
        # Acceptance where the verifier judged: past the first rejection the block's prefix is one it
        # turned down, where agreement is lower and never used (alpha is P(accepted | prefix accepted)).
        judged = min(len(block), verdict.num_accepted + 1)
        alphas = pairwise_alpha(q_draft[:judged], p_target[:judged]).tolist()
        confident = block.confidence is not None and len(block) > 0
        agreed = (p_target[: len(block)].argmax(-1) == torch.tensor(block.token_ids)).tolist() if confident else None
        records.append(VerifyRecord(drafter, verifier, len(block), verdict.num_accepted, alphas, max(asked, len(block)),
                                    confidence=list(block.confidence) if confident else None, agreed=agreed))
