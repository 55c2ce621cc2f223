"""The router's knobs (plain data, no torch: the serving configuration names their defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from specrouter.routing.profiler import BUCKETS


MAX_DRAFT_LEN = BUCKETS[-1] - 1  # the longest block the router plans: with the verifier's token, the profiler's widest pass


@dataclass(frozen=True)
class RouterConfig:
    replan_every: int = 2  # steps a request alone keeps its plan before re-planning
    hysteresis: float = 0.05  # a request alone switches only to a plan predicted this much faster than its own
    explore_every: int = 12  # steps after which a level (else a pair) not measured since gets one exploratory step
    explore_margin: float = 1.2  # ... if its best plan is predicted at most this much slower than the best (else a probe)
    batch_speculation_margin: float = 0.1  # a batch of two or more speculates only if predicted at least this much
    # faster than plain batched decoding: predictions are rough, and at a large batch a wrong bet slows every request
    max_drafters: int = 3  # the most drafters in a chain
    lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)  # the draft lengths searched
    # ... and for prompt lookup, whose long matches go on for dozens of tokens: where a wide pass costs
    # much less a token than a narrow one (llama.cpp: 32 rows cost about 9 one-token passes), its blocks
    # pay. With the verifier's own token, each fills one of the profiler's pass sizes (BUCKETS).
    lookup_lengths: tuple[int, ...] = (1, 2, 3, 5, 7, 11, 15, 23, 31)
    default_cost_s: float = 0.05  # cost assumed for a level never measured
