"""Prometheus metrics with vLLM's names and meanings, under the `specrouter:` prefix.

    specrouter:num_requests_running / num_requests_waiting      gauges
    specrouter:prompt_tokens_total / generation_tokens_total    counters
    specrouter:request_success_total{finished_reason}           counter
    specrouter:time_to_first_token_seconds                      histogram
    specrouter:inter_token_latency_seconds                      histogram (per generated token)
    specrouter:e2e_request_latency_seconds                      histogram
    specrouter:request_generation_tokens_per_second             histogram (per request)
    specrouter:spec_decode_num_drafts_total{level}              counter (verification rounds of a level)
    specrouter:spec_decode_num_draft_tokens_total{level}        counter
    specrouter:spec_decode_num_accepted_tokens_total{level}     counter
    specrouter:chain_selected_total{chain}                      counter (steps run on each chain)
    specrouter:request_rejected_total{reason}                   counter (refused: waiting_requests, waiting_tokens
                                                                 (429 / RESOURCE_EXHAUSTED), unauthenticated)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series (vLLM's exposition has none either)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("specrouter:num_requests_running", "Requests generating now.", registry=r)
        self.waiting = Gauge("specrouter:num_requests_waiting", "Requests queued, not yet generating.", registry=r)
        self.prompt_tokens = Counter("specrouter:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("specrouter:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("specrouter:request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.ttft = Histogram("specrouter:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("specrouter:inter_token_latency_seconds", "Time per generated token after the first.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("specrouter:e2e_request_latency_seconds", "Request latency.", buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram("specrouter:request_generation_tokens_per_second", "Generation speed per request.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.drafts = Counter("specrouter:spec_decode_num_drafts", "Draft blocks verified.", ["level"], registry=r)
        self.draft_tokens = Counter("specrouter:spec_decode_num_draft_tokens", "Draft tokens proposed.", ["level"], registry=r)
        self.accepted_tokens = Counter("specrouter:spec_decode_num_accepted_tokens", "Draft tokens accepted.", ["level"], registry=r)
        self.chains = Counter("specrouter:chain_selected", "Steps run on each chain.", ["chain"], registry=r)
        self.rejected = Counter("specrouter:request_rejected", "Requests refused, by reason.", ["reason"], registry=r)
        for reason in ("waiting_requests", "waiting_tokens", "unauthenticated"):
            self.rejected.labels(reason)  # every reason shows from the start, at 0

    def observe_request(self, stats: dict, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                        ttft_s: float | None, e2e_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.success.labels(finish_reason).inc()
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if completion_tokens > 1:
                per_token = (e2e_s - ttft_s) / (completion_tokens - 1)
                for _ in range(completion_tokens - 1):
                    self.itl.observe(per_token)
        if e2e_s > 0:
            self.tokens_per_s.observe(completion_tokens / e2e_s)
        for level in stats.get("levels", [])[:-1]:  # drafters; the last level is the target
            self.drafts.labels(level["name"]).inc(level["num_rounds"])
            self.draft_tokens.labels(level["name"]).inc(level["num_draft_tokens"])
            self.accepted_tokens.labels(level["name"]).inc(level["num_accepted_tokens"])
        routing = stats.get("routing")
        if routing:
            for plan in routing["steps_by_plan"]:
                self.chains.labels(" -> ".join(plan["chain"])).inc(plan["steps"])
        else:
            self.chains.labels(" -> ".join(stats.get("chain", []))).inc(stats.get("num_target_steps", 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
