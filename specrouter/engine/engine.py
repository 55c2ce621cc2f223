"""The engine: builds a chain from a spec (see specrouter/core/spec.py) over workers from a provider
(in-process by default), and runs requests through the generation loop (specrouter/engine/loop.py),
with its static chain or with the chains a router picks."""

from __future__ import annotations

import logging
import time

import torch

from specrouter.core.chain import Chain
from specrouter.core.records import LevelStats
from specrouter.core.levels import Level, ModelLevel, NgramLevel
from specrouter.core.model import KVPool
from specrouter.core.retokenize import retokenizer
from specrouter.core.sampling import SamplingParams
from specrouter.core.spec import LevelSpec, chain_summary, parse_chain, slim_spec
from specrouter.core.tiers import QualityBudget, Thresholds
from specrouter.core.store import ModelStore, WorkerProvider
from specrouter.core.vocab import vocab_map
from specrouter.core.worker import WorkerUnavailable
from specrouter.engine.defaults import MAX_BATCH, RETRY_DOWN_AFTER_S
from specrouter.engine.loop import BatchLoop, GenerationResult
from specrouter.routing.router import AdaptiveRouter
from specrouter.routing.scheduler import Plan


log = logging.getLogger(__name__)


class TargetUnavailable(RuntimeError):
    """The target stopped answering: the request fails cleanly; the service recovers on restart."""


DEFAULT_DRAFT_LEN = {"model": 4, "ngram": 4, "ngram:N": 16}  # ngram:N: a long match goes on for long
CAPPED_DRAFT_LEN = 10  # a bottom model that stops unsure (draft_confidence): its block length is only a cap


def _vocab_report(level: Level) -> dict | None:
    return level.vocab.report() if level.vocab is not None else None


class Engine:
    def __init__(
        self,
        chain: str | list[LevelSpec],
        dtype: str = "float32",
        device: str = "cpu",
        draft_lens: list[int] | None = None,
        num_threads: int | None = None,
        provider: WorkerProvider | None = None,
        retry_down_after_s: float = RETRY_DOWN_AFTER_S,
        draft_confidence: float = 0.0,
        bit_exact: bool = True,
        slim_verifier: str | None = None,
    ):
        """`provider` supplies the workers (default: an in-process ModelStore for dtype and device).
        A drafter on another tokenizer than the target's drafts greedy requests freely and has its text
        re-tokenised, sampled ones on the shared tokens (specrouter/core/levels.py). A drafter that stops
        answering is left out of chains for `retry_down_after_s`, then tried again.
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
                levels.append(NgramLevel(info.vocab_size, min_n=spec.min_match or 2, name=spec.label))
                continue
            worker = self.provider.worker(spec, target.label)
            tokenizer, fingerprint = self.provider.tokenizer(spec)
            vocab, retok = None, None
            if fingerprint != target_fp:  # another tokenizer: restrict to the shared tokens, speak target ids
                fingerprints = (fingerprint, target_fp)
                vocab = vocab_map(tokenizer, info.tokenizer, worker.vocab_size, info.vocab_size, fingerprints)
                retok = retokenizer(tokenizer, info.tokenizer, worker.vocab_size, info.vocab_size, fingerprints)
            levels.append(ModelLevel(worker.name, worker, vocab, retok, draft_confidence, bit_exact))
        self.levels: dict[str, Level] = {level.name: level for level in levels}  # the pool, cheapest first
        if len(self.levels) != len(levels):
            raise ValueError(f"chain names a level twice: {[level.name for level in levels]}")
        if draft_lens is None:
            kinds = ["model" if s.model != "ngram" else "ngram" if s.min_match is None else "ngram:N" for s in self.specs[:-1]]
            draft_lens = [DEFAULT_DRAFT_LEN[kind] for kind in kinds]
            if draft_lens and draft_confidence and self.specs[0].model != "ngram":
                draft_lens[0] = CAPPED_DRAFT_LEN
        slim = slim_spec(slim_verifier, target) if slim_verifier else None
        self.slim = self._slim_level(slim, target) if slim else None
        self.chain = Chain(levels, list(draft_lens), self.slim)  # the static chain: every level, in order
        if len(levels) > 1 and levels[-1].max_block == 0:
            log.warning("%s", chain_summary(",".join(self.chain.names), 0))
        self._chains: dict[tuple, Chain] = {}
        self._down: dict[str, float] = {}  # drafter -> when it stopped answering
        self.retry_down_after_s = retry_down_after_s

    @property
    def down(self) -> frozenset[str]:
        """Drafters currently left out of chains because they stopped answering."""
        now = time.monotonic()
        return frozenset(n for n, t in self._down.items() if now - t < self.retry_down_after_s)

    def mark_down(self, exc: WorkerUnavailable, chain: Chain) -> None:
        """A level of `chain` stopped answering: a drafter is left out of chains for a while (live_chain)
        and its cached state forgotten; the target raises TargetUnavailable."""
        if exc.level == chain.names[-1]:
            raise TargetUnavailable(f"target {exc.level!r} is unavailable; retry after it restarts") from exc
        self._down[exc.level] = time.monotonic()
        self.levels[exc.level].forget()

    def live_chain(self, chain: Chain) -> Chain:
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

    def _slim_level(self, spec: LevelSpec, target: LevelSpec) -> Level:
        worker = self.provider.worker(spec, target.label)
        if worker.name in self.levels:
            raise ValueError(f"slim verifier {worker.name!r} is also a level of the chain")
        return ModelLevel(worker.name, worker)

    @property
    def kv_pool(self) -> KVPool | None:
        """The room the models' shared KV pools leave a request (None: no limit); the loop admits into it."""
        pools = [level.worker.kv_pool for level in self.all_levels if isinstance(level, ModelLevel) and level.worker.kv_pool]
        return KVPool(min(p.positions for p in pools), min(p.sequences for p in pools)) if pools else None

    @property
    def all_levels(self) -> list[Level]:
        """Every level that may hold a sequence's state: the chains' and the slim verifier."""
        return list(self.levels.values()) + ([self.slim] if self.slim is not None else [])

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        seed: int = 0,
        ignore_eos: bool = False,
        router: AdaptiveRouter | None = None,
        klass: str = "default",
        tiered: Thresholds | QualityBudget | None = None,
    ) -> GenerationResult:
        """Generate for one request (a batch of one in the generation loop), with the static chain, or
        with the chain `router` picks before every step for a request of class `klass`; with `tiered`,
        in the opt-in lossy tiered verification mode (specrouter/core/tiered.py), by thresholds or by a
        quality budget."""
        request = {"prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens, "params": params, "seed": seed,
                   "ignore_eos": ignore_eos, "klass": klass, "tiered": tiered}
        return BatchLoop(self, router, max_batch=1).run([request])[0]

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                      seed: int = 0, max_batch: int = MAX_BATCH) -> list[GenerationResult]:
        """Generate for many requests in one continuous batch of up to `max_batch` (request i seeded
        `seed + i`), with the static chain; results in the prompts' order. A batched pass may round
        differently from a pass of one sequence, so a greedy text may take the other side of a near-tie."""
        requests = [{"prompt_ids": prompt, "max_new_tokens": max_new_tokens, "params": params, "seed": seed + i}
                    for i, prompt in enumerate(prompts)]
        return BatchLoop(self, max_batch=max_batch).run(requests)

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
