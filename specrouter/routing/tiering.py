"""Whether a step of tiered (lossy) verification pays for what it risks.

Tiered verification (specrouter/core/tiered.py) commits tokens that no check, or only a slim one,
looked at. It is worth that only where it is faster than the lossless plan the router would run
instead: on a CPU an unchecked token still costs its drafter's pass and a row of the target's next
pass (its catch-up), so tiering can lose to the target decoding alone. The choice therefore follows
measured time per committed token of both modes, per prompt class and batch size, as the loop runs
them: a request in tiered mode tiers only while its tiered steps are measured at least `margin`
faster than its lossless ones; the mode out of use runs once every `explore_every` steps, so a
mode that got faster is seen (explore_every <= 0: never, once both are measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATE_WEIGHT = 0.2  # weight of a step's seconds per token in the running estimate of its mode


@dataclass
class TieringChoice:
    margin: float = 0.05  # tier only where measured at least this much faster than lossless steps
    explore_every: int = 12  # steps after which the mode out of use runs once (<= 0: never)
    _rates: dict[tuple[str, int, bool], float] = field(default_factory=dict)  # (class, batch, tiered) -> s/token
    _streak: dict[tuple[str, int], tuple[bool, int]] = field(default_factory=dict)  # (class, batch) -> (mode, steps in a row)

    def rate(self, klass: str, batch: int, tiered: bool) -> float | None:
        """Measured seconds per committed token of tiered (or lossless) steps, None until one ran."""
        return self._rates.get((klass, batch, tiered))

    def choose(self, klass: str, batch: int) -> tuple[bool, str]:
        """Whether the next step of a batch of `batch` led by a request of `klass` tiers, and why."""
        tiered, lossless = self.rate(klass, batch, True), self.rate(klass, batch, False)
        if tiered is None:
            return True, "tiered: not measured yet"
        if lossless is None:
            return False, "lossless: not measured yet"
        faster = tiered < lossless * (1 - self.margin)
        mode, steps = self._streak.get((klass, batch), (faster, 0))
        if mode == faster and 0 < self.explore_every <= steps:
            return not faster, f"{'lossless' if faster else 'tiered'}: not measured for {self.explore_every}+ steps"
        if faster:
            return True, f"tiered: {tiered * 1e3:.1f} ms a token against {lossless * 1e3:.1f} lossless"
        return False, f"lossless: tiered measured {tiered * 1e3:.1f} ms a token against {lossless * 1e3:.1f}"

    def observe(self, klass: str, batch: int, tiered: bool, seconds: float, tokens: int) -> None:
        """A decode step's time and the tokens it committed (summed over the batch) in one mode."""
        if tokens <= 0:
            return
        key, per_token = (klass, batch, tiered), seconds / tokens
        old = self._rates.get(key)
        self._rates[key] = per_token if old is None else old + RATE_WEIGHT * (per_token - old)
        mode, steps = self._streak.get((klass, batch), (tiered, 0))
        self._streak[(klass, batch)] = (tiered, steps + 1 if mode == tiered else 1)
