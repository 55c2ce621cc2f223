"""What a drafter alignment run takes (specrouter/tasks/align.py), without torch: the command line
reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("fkl", "tvd")  # forward KL(p_target || q_draft), total variation: drafters on the target's tokenizer
LOSSES = DIVERGENCES + ("seqkd",)  # seqkd: cross-entropy on the target's text, for a drafter on any tokenizer


@dataclass(frozen=True)
class AlignConfig:
    """Total variation by default, whose complement is the acceptance that alignment is for, at a
    gentle rate (one sequence a step makes for noisy gradients)."""

    steps: int = 150
    lr: float = 1e-4
    rank: int = 16
    lora_alpha: int = 32
    continuation_tokens: int = 48
    max_prompt_tokens: int = 192
    on_policy_every: int = 2  # every n-th step trains on the drafter's own continuation (0: never; seqkd: never)
    loss: str = "tvd"
    save_every: int = 10
    seed: int = 0
