"""One generation request as the front end takes it: plain data, no torch, so the serving
processes that only relay requests (the Serve replica, the CLI) stay light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[int] | None = None  # text or token ids
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) for the chat template
    max_tokens: int | None = None  # None: up to default_max_tokens, within the context window
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    prompt_class: str | None = None
    timeout_s: float | None = None  # the batch retires the request (finish_reason "timeout") this long after it is queued
    tiered: tuple[float, float] | None = None  # (tau_high, tau_low): opt-in lossy tiered verification; None: lossless
    max_disagreement: float | None = None  # tiered verification by this quality budget instead of thresholds

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")


class Overloaded(RuntimeError):
    """The batch's queue is full: the request was refused before it was queued (retry later).
    `reason`: "waiting_requests" or "waiting_tokens", the limit it hit."""

    def __init__(self, message: str, reason: str):
        super().__init__(message, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.args[0]
