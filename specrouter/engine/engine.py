"""The engine: builds a chain from a spec (see specrouter/core/spec.py) over workers from a provider
(in-process by default), and runs the generation loop with a static or a routed chain."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from specrouter.core.chain import Chain, StepContext, speculative_step
from specrouter.core.tiered import tiered_step
from specrouter.core.tiers import Thresholds, TierCounts
from specrouter.core.levels import Level, ModelLevel, NgramLevel
from specrouter.core.records import LevelStats, TimingRecord
from specrouter.core.sampling import SamplingParams
from specrouter.routing.scheduler import Plan
from specrouter.core.sequence import SequenceState
from specrouter.core.shadow import shadow_records
from specrouter.core.retokenize import retokenizer
from specrouter.core.spec import LevelSpec, parse_chain
from specrouter.core.store import ModelStore, WorkerProvider
from specrouter.core.vocab import vocab_map
from specrouter.core.worker import WorkerUnavailable


class TargetUnavailable(RuntimeError):
    """The target stopped answering: the request fails cleanly; the service recovers on restart."""


class Route(Protocol):
    """A request's chain policy: which chain runs the next step, and what it learns from each step."""

    def next_plan(self, backlog: dict[str, int] | None = None, remaining: float = float("inf")) -> Plan:
        """`backlog`: context tokens each drafter has not cached; `remaining`: tokens still to generate."""
        ...

    def observe(self, records: list, committed: int, seconds: float) -> None: ...

    def explain(self) -> dict: ...


DEFAULT_DRAFT_LEN = {"model": 4, "ngram": 4}
CAPPED_DRAFT_LEN = 10  # a bottom model that stops unsure (draft_confidence): its block length is only a cap


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "stop" (end token) or "length"
    elapsed_s: float
    num_steps: int  # target verifications
    chain: list[str]
    draft_lens: list[int]
    level_stats: list[LevelStats]
    text: str | None = None
    prompt_tokens: int = 0
    routing: dict | None = None  # which chains ran and why (adaptive routing)
    tiered: Thresholds | None = None  # opt-in lossy tiered verification ran (None: lossless)
    tiers: TierCounts | None = None  # with `tiered`: the committed tokens each tier decided

    @property
    def lossy(self) -> bool:
        """The output may differ from the target's alone (tiered verification with a tier below the target)."""
        return self.tiered is not None and not self.tiered.lossless

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "num_target_steps": self.num_steps,
            "tokens_per_target_step": round(len(self.token_ids) / self.num_steps, 3) if self.num_steps else 0.0,
            "chain": self.chain,
            "draft_lens": self.draft_lens,
            "levels": [s.as_dict() for s in self.level_stats],
            **({"routing": self.routing} if self.routing is not None else {}),
            "lossy": self.lossy,
            **({"verification": "tiered", "tau_high": self.tiered.tau_high, "tau_low": self.tiered.tau_low,
                "tiers": self.tiers.as_dict()} if self.tiered is not None else {}),
        }


def _vocab_report(level: Level) -> dict | None:
    return level.vocab.report() if level.vocab is not None else None


def run_to_end(steps: Generator):
    """Drive a generation-steps generator (Engine.steps' protocol) to its end; return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class Engine:
    def __init__(
        self,
        chain: str | list[LevelSpec],
        dtype: str = "float32",
        device: str = "cpu",
        draft_lens: list[int] | None = None,
        num_threads: int | None = None,
        provider: WorkerProvider | None = None,
        retry_down_after_s: float = 5.0,
        retokenize_greedy: bool = True,
        draft_confidence: float = 0.0,
        bit_exact: bool = True,
        slim_verifier: str | None = None,
    ):
        """`provider` supplies the workers (default: an in-process ModelStore for dtype and device).
        A drafter on another tokenizer than the target's drafts greedy requests freely and has its text
        re-tokenised (`retokenize_greedy`), else it stays on the shared tokens (specrouter/core/levels.py).
        A drafting model ends its block after a token it gave less than `draft_confidence` probability
        (transformers' assistant_confidence_threshold; 0: never), at the bottom of a chain or in the middle.
        `bit_exact`: a target whose wider passes round differently from one-token passes (a llama.cpp level:
        its measured `exact_width`) verifies blocks no longer than it verifies bit-exactly, so greedy output
        is the target's alone token for token; False lets blocks run longer (faster, and equal up to
        rounding: a near-tie can flip).
        `slim_verifier`: the level spec of tiered verification's slim verifier (specrouter/core/tiered.py),
        a skip-layer view of the target (e.g. "NAME@skip:12+13"; "@skip" alone: the target's measured
        default set); None: requests in tiered mode send tier-2 tokens to the full target."""
        if not 0.0 <= draft_confidence < 1.0:
            raise ValueError(f"draft_confidence must be in [0, 1), got {draft_confidence}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.specs = parse_chain(chain) if isinstance(chain, str) else list(chain)
        self.provider = provider or ModelStore(dtype, device, num_threads)
        target = self.specs[-1]
        info = self.provider.target_info(target.model, target.quant)
        self.tokenizer, self.eos_ids, self.max_positions = info.tokenizer, info.eos_ids, info.max_positions
        self.vocab_size = info.vocab_size
        _, target_fp = self.provider.tokenizer(self.specs[-1])
        levels: list[Level] = []
        for spec in self.specs:
            if spec.model == "ngram":
                levels.append(NgramLevel(info.vocab_size))
                continue
            worker = self.provider.worker(spec, target.label)
            tokenizer, fingerprint = self.provider.tokenizer(spec)
            vocab, retok = None, None
            if fingerprint != target_fp:  # another tokenizer: restrict to the shared tokens, speak target ids
                fingerprints = (fingerprint, target_fp)
                vocab = vocab_map(tokenizer, info.tokenizer, worker.vocab_size, info.vocab_size, fingerprints)
                if retokenize_greedy:
                    retok = retokenizer(tokenizer, info.tokenizer, worker.vocab_size, info.vocab_size, fingerprints)
            levels.append(ModelLevel(worker.name, worker, vocab, retok, draft_confidence, bit_exact))
        self.levels: dict[str, Level] = {level.name: level for level in levels}  # the pool, cheapest first
        if len(self.levels) != len(levels):
            raise ValueError(f"chain names a level twice: {[level.name for level in levels]}")
        if draft_lens is None:
            draft_lens = [DEFAULT_DRAFT_LEN["ngram" if s.model == "ngram" else "model"] for s in self.specs[:-1]]
            if draft_lens and draft_confidence and self.specs[0].model != "ngram":
                draft_lens[0] = CAPPED_DRAFT_LEN
        self.slim = self._slim_level(slim_verifier, target) if slim_verifier else None
        self.chain = Chain(levels, list(draft_lens), self.slim)  # the static chain: every level, in order
        self._chains: dict[tuple, Chain] = {}
        self._down: dict[str, float] = {}  # drafter -> when it stopped answering
        self.retry_down_after_s = retry_down_after_s

    @property
    def down(self) -> frozenset[str]:
        """Drafters currently left out of chains because they stopped answering."""
        now = time.monotonic()
        return frozenset(n for n, t in self._down.items() if now - t < self.retry_down_after_s)

    def _mark_down(self, exc: WorkerUnavailable, chain: Chain) -> None:
        if exc.level == chain.names[-1]:
            raise TargetUnavailable(f"target {exc.level!r} is unavailable; retry after it restarts") from exc
        self._down[exc.level] = time.monotonic()
        self.levels[exc.level].forget()

    def _live(self, chain: Chain) -> Chain:
        """`chain` without drafters that stopped answering less than `retry_down_after_s` ago."""
        for name in self.down.intersection(chain.names[:-1]):
            chain = chain.without(name)
        return chain

    @property
    def target_name(self) -> str:
        return self.chain.names[-1]

    def replace_level(self, name: str, level: Level) -> None:
        """Swap the level behind a name (e.g. a restarted worker); chains are rebuilt on next use."""
        self.levels[name] = level
        self._chains.clear()
        self.chain = Chain([self.levels[n] for n in self.chain.names], self.chain.draft_lens, self.slim)

    def chain_for(self, plan: Plan) -> Chain:
        key = (plan.chain, plan.draft_lens)
        if key not in self._chains:
            self._chains[key] = Chain([self.levels[name] for name in plan.chain], list(plan.draft_lens), self.slim)
        return self._chains[key]

    def _slim_level(self, text: str, target: LevelSpec) -> Level:
        spec = LevelSpec.parse(target.model + text if text.startswith("@") else text)
        if spec.model != target.model or spec.skip_layers is None or spec.quant != target.quant:
            raise ValueError(f"slim verifier {text!r}: it must be the target {target.label!r} with @skip (a view over its weights)")
        worker = self.provider.worker(spec, target.label)
        if worker.name in self.levels:
            raise ValueError(f"slim verifier {worker.name!r} is also a level of the chain")
        return ModelLevel(worker.name, worker)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        seed: int = 0,
        ignore_eos: bool = False,
        route: Route | None = None,
        tiered: Thresholds | None = None,
    ) -> GenerationResult:
        """Generate with the static chain, or with the chain `route` picks before every step; with
        `tiered`, in the opt-in lossy tiered verification mode (specrouter/core/tiered.py)."""
        return run_to_end(self.steps(prompt_ids, max_new_tokens, params, seed, ignore_eos, route, tiered))

    def steps(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        seed: int = 0,
        ignore_eos: bool = False,
        route: Route | None = None,
        tiered: Thresholds | None = None,
    ) -> Generator[list[int], bool | None, GenerationResult]:
        """The generation loop as a generator: yields the tokens each step commits (target-verified,
        the end token included) and returns the GenerationResult. `send(True)` ends the generation
        after the last yielded block with finish_reason "stop" (a stop string matched); closing it
        (the client went away) also releases the sequence's state on every worker."""
        self.check_request(len(prompt_ids), max_new_tokens)
        seq = SequenceState.new(uuid.uuid4().hex, list(prompt_ids))
        ctx = StepContext(
            params=params,
            generator=torch.Generator().manual_seed(seed),
            eos_ids=frozenset() if ignore_eos else self.eos_ids,
            stats=self.new_stats(),
            tiered=tiered,
        )
        step = tiered_step if tiered is not None else speculative_step
        finish, steps, chain = "length", 0, self.chain
        t0 = time.perf_counter()
        try:
            while len(seq.generated) < max_new_tokens:
                chain = self._live(self.chain_for(self._next_plan(route, seq, max_new_tokens)) if route is not None else self.chain)
                t_step = time.perf_counter()
                timings: list[TimingRecord] = []
                try:
                    (new,) = step(chain, [seq], [ctx], [max_new_tokens - len(seq.generated)], timings)
                except WorkerUnavailable as exc:
                    self._mark_down(exc, chain)
                    ctx.drain_records()
                    continue  # nothing was committed: redo the step on the shorter chain
                steps += 1
                records = timings + ctx.drain_records()
                if route is not None:
                    records += self._shadow(chain, seq, new)
                    route.observe(records, len(new), time.perf_counter() - t_step)
                end = next((i for i, t in enumerate(new) if t in ctx.eos_ids), None)
                if end is not None:
                    new, finish = new[: end + 1], "stop"
                seq = seq.commit(new)
                if (yield new) or finish == "stop":
                    finish = "stop"
                    break
        finally:
            for level in self.all_levels:
                level.release(seq.seq_id)
        return GenerationResult(
            token_ids=list(seq.generated),
            finish_reason=finish,
            elapsed_s=time.perf_counter() - t0,
            num_steps=steps,
            chain=chain.names,
            draft_lens=list(chain.draft_lens),
            level_stats=[s for s in ctx.stats.values() if s.time_s > 0 or s.num_draft_tokens],
            prompt_tokens=len(prompt_ids),
            routing=route.explain() if route is not None else None,
            tiered=tiered,
            tiers=ctx.tiers if tiered is not None else None,
        )

    @property
    def all_levels(self) -> list[Level]:
        """Every level that may hold a sequence's state: the chains' and the slim verifier."""
        return list(self.levels.values()) + ([self.slim] if self.slim is not None else [])

    def _shadow(self, chain: Chain, seq: SequenceState, new: list[int]) -> list:
        """Records of the prompt-lookup drafters this step's target did not verify (out of its chain,
        or under a middle level), replayed on its tokens (specrouter/core/shadow.py): a routed request
        measures them against the target on every step, for free."""
        verified = chain.names[-2] if len(chain.names) > 1 else None  # the level the target verified
        return [r for level in self.levels.values() if isinstance(level, NgramLevel) and level.name != verified
                for r in shadow_records(level, seq, new, self.target_name, CAPPED_DRAFT_LEN)]

    def _next_plan(self, route: Route, seq: SequenceState, max_new_tokens: int) -> Plan:
        backlog = {name: level.backlog(seq.seq_id, len(seq.token_ids)) for name, level in self.levels.items() if name != self.target_name}
        return route.next_plan(backlog, max_new_tokens - len(seq.generated))

    def new_stats(self) -> dict[str, LevelStats]:
        """Fresh per-level statistics for one request (with each cross-tokenizer level's mapping report)."""
        return {name: LevelStats(name, vocab_map=_vocab_report(level)) for name, level in self.levels.items()}

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError for a request this engine cannot run (before any work starts)."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if prompt_len + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_new_tokens}) exceeds the context "
                f"window of {self.max_positions} tokens"
            )

    def generate_text(self, prompt: str, max_new_tokens: int, **kwargs) -> GenerationResult:
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        result = self.generate(prompt_ids, max_new_tokens, **kwargs)
        result.text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        return result
