"""Lossless verification of a draft block: a pure rejection sampler.

Glossary (vLLM's words):
- *accepted* tokens: draft tokens kept, each with probability min(1, p_target(x) / q_draft(x));
- *recovered* token: at the first rejection, a token drawn from the normalised residual
  max(p_target - q_draft, 0);
- *bonus* token: when every draft token is accepted, one more token drawn from p_target at the
  position after the block.
Output = accepted + (recovered | bonus), so every verification emits at least one token, and each
emitted token is distributed exactly as p_target given its prefix (Leviathan et al., Chen et al.).
With one-hot (greedy) distributions this reduces to "keep the longest matching prefix, then the
target's argmax".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrouter.core.sampling import sample


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]  # accepted draft tokens + one recovered or bonus token
    num_accepted: int
    bonus: bool  # True: the last token is a bonus token; False: it is a recovered token
    p_rows: torch.Tensor  # [len(tokens), V]: p_target at each emitted position (the proposal for the level above)


def rejection_sample(
    draft_token_ids: list[int],
    q_draft: torch.Tensor,  # [k, V]: distribution each draft token was drawn from
    p_target: torch.Tensor,  # [k + 1, V]: verifier's distribution at each draft position and one past the block
    generator: torch.Generator | None,
) -> Verdict:
    k = len(draft_token_ids)
    assert p_target.shape[0] == k + 1 and q_draft.shape[0] == k, (p_target.shape, q_draft.shape, k)
    num_accepted = k
    if k:
        draft = torch.tensor(draft_token_ids, device=p_target.device)  # [k]
        rows = torch.arange(k, device=p_target.device)
        p_x = p_target[rows, draft]  # [k]
        q_x = q_draft[rows, draft]  # [k]
        u = torch.rand(k, generator=generator, device=p_target.device)  # [k]
        rejected = (u * q_x >= p_x).nonzero()  # accept iff u < p/q
        if len(rejected):
            num_accepted = int(rejected[0, 0])
    if num_accepted == k:
        last = int(sample(p_target[k : k + 1], generator)[0])
    else:
        residual = (p_target[num_accepted] - q_draft[num_accepted]).clamp_min(0.0)  # [V]
        total = residual.sum()
        # total == 0 only when p == q exactly, where rejection is impossible; fall back to p.
        residual = residual / total if total > 0 else p_target[num_accepted]
        last = int(sample(residual[None], generator)[0])
    tokens = list(draft_token_ids[:num_accepted]) + [last]
    return Verdict(tokens=tokens, num_accepted=num_accepted, bonus=num_accepted == k, p_rows=p_target[: num_accepted + 1])


def pairwise_alpha(q_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """q_draft [k, V], p_target [k, V] -> [k]: sum_x min(q, p) per position (1 - total variation), the
    probability that `rejection_sample` accepts a token drawn from q_draft there."""
    return torch.minimum(q_draft, p_target).sum(-1)
