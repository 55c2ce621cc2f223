"""The distributed runtime: one Ray actor per model (its slim views live in the same actor, sharing
its weights), each serving the gRPC data plane; a router actor runs the chains over them.

    ray_started = start_local_ray()            # embedded default: a light local Ray, if none is up
    router = RouterActor.remote("qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b", dtype="bfloat16")
    ray.get(router.generate.remote(prompt_ids, 64))

Placement comes from config per model: `num_cpus` plus a torch thread budget on CPU, or `num_gpus`,
`accelerator_type`, and custom resources (e.g. {"accel_a": 1}) on a cluster.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import ray

from specrouter.core.hugepages import with_huge_pages
from specrouter.core.spec import LevelSpec, parse_chain, slim_spec
from specrouter.engine.defaults import DECODE_RUN_S, MAX_BATCH, PREFILL_CHUNK, RETRY_DOWN_AFTER_S
from specrouter.routing.config import RouterConfig

LOCAL_RAY_STARTS = 2  # a local Ray whose node does not come up (a loaded machine) is started once more


@dataclass(frozen=True)
class Placement:
    """Where one model's actor runs and how many threads its torch may use. Keyed in config by the
    model's label (`name` or `name@int8`), its name, or "*" for every model."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int | None = None  # None: every core of the node (the chain's models take turns)
    device: str = "cpu"
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the actor's process (huge pages on unless it sets them)
    kv_cache_tokens: int | None = None  # a llama.cpp model's KV cache, in positions (None: the default)
    share_prefixes: bool = True  # a llama.cpp model's sequences share the cells of the prompt tokens they begin with alike

    def actor_options(self) -> dict:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources),
                   "runtime_env": {"env_vars": with_huge_pages(self.env)}}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        return options


def model_key(spec: LevelSpec) -> LevelSpec:
    """The model a level runs on: its spec without @skip (a skip-layer view shares its model's actor)."""
    return LevelSpec(spec.model, None, spec.quant, spec.task)


def placement_for(spec: LevelSpec, placement: dict[str, Placement]) -> Placement:
    """A model's placement: the entry for its label (`name@int8`), else for its name, else "*"."""
    return placement.get(spec.label) or placement.get(spec.model) or placement.get("*") or Placement()


def start_local_ray(num_cpus: int | None = None) -> bool:
    """Start a light local Ray unless one is already initialised; True if this call started it
    (so the caller stops only what it started, with ray.shutdown())."""
    if ray.is_initialized():
        return False
    # Every CPU cycle Ray's own processes spend idling is taken from the model workers' threads.
    os.environ.setdefault("RAY_worker_niceness", "0")  # model workers must not lose the CPU to others
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "1")  # Serve's controller checks its replicas every 1 s, not 0.1
    options = dict(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=128 << 20,
                   log_to_driver=False,
                   _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                                   "enable_metrics_collection": False})  # Ray's own metrics; ours are served at /metrics
    import psutil  # Ray's own dependency

    for attempt in range(1, LOCAL_RAY_STARTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return True
        except Exception as exc:  # Ray raises a bare Exception when its node does not come up in 30 s
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):  # what this attempt started (its GCS, ...)
                if child.pid not in before:
                    child.kill()
            if attempt == LOCAL_RAY_STARTS:
                raise
            print(f"specrouter: the local Ray did not start ({exc}); starting it again", file=sys.stderr, flush=True)


@ray.remote(max_restarts=-1, max_concurrency=4)
class WorkerActor:
    """One loaded model and its views, each a ModelWorker with per-sequence KV caches, behind gRPC."""

    def __init__(self, model: str, quant: str | None, task: str | None, views: list[tuple[int, ...]], dtype: str, device: str,
                 torch_threads: int | None, kv_cache_tokens: int | None = None, share_prefixes: bool = True):
        import torch

        from specrouter.runtime.dataplane import WorkerServicer, model_thread, worker_info
        from specrouter.runtime.grpc_server import BackgroundServer
        from specrouter.core.store import ModelStore

        def load() -> tuple[dict, dict]:
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1): without a budget of its own, a model
            # would run single-threaded although the chain's models take turns on every core.
            threads = torch_threads or len(os.sched_getaffinity(0))
            torch.set_num_threads(threads)
            store = ModelStore(dtype, device, threads, kv_cache_tokens, share_prefixes)
            workers = {}
            for skip in views:
                worker = store.worker(LevelSpec(model, skip or None, quant, task), target=model)
                workers[worker.name] = worker
            loaded = store.get(model, quant, task)
            # What the router needs of the model; its tokenizer stays with the router, not here.
            return workers, {
                "views": list(workers),
                "fingerprint": loaded.fingerprint,
                "max_positions": loaded.info.max_positions,
                "eos_ids": sorted(loaded.info.eos_ids),
                # vocabulary, exact width and KV pool: properties of the model, the same for every view
                **worker_info(next(iter(workers.values()))),  # what a RemoteWorker reads
            }

        label = LevelSpec(model, None, quant, task).label
        thread = model_thread(label)  # loads and runs the model: one OpenMP pool in this process
        workers, self.description = thread.submit(load).result()
        release_free_memory()  # the tokenizer and whatever else loading left behind
        self.server = BackgroundServer(WorkerServicer(label, workers, thread), _data_plane_host())

    def address(self) -> str:
        return self.server.address

    def describe(self) -> dict:
        return {**self.description, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def health(self) -> bool:
        return True


class RayWorkers:
    """A WorkerProvider whose workers are Ray actors: one per model, keyed by its level spec without
    @skip (name, aligned task, quantisation); skip-layer views of a model live in that model's actor.
    An aligned drafter (+task:) is a model of its own: its actor finds the adapter in its node's cache."""

    def __init__(self, specs: list[LevelSpec], dtype: str = "bfloat16", placement: dict[str, Placement] | None = None,
                 timeout_s: float = 120.0):
        from specrouter.core.store import resolve_skip

        self.dtype, self.timeout_s = dtype, timeout_s
        placement = placement or {}
        groups: dict[LevelSpec, list[LevelSpec]] = {}
        for spec in specs:
            if spec.model != "ngram":
                groups.setdefault(model_key(spec), []).append(spec)
        self.actors: dict[LevelSpec, ray.actor.ActorHandle] = {}
        for key, members in groups.items():
            place = placement_for(key, placement)
            views = sorted({resolve_skip(s, functools.partial(_num_layers, key.model)) for s in members})
            self.actors[key] = WorkerActor.options(**place.actor_options()).remote(
                key.model, key.quant, key.task, views, dtype, place.device, place.torch_threads, place.kv_cache_tokens,
                place.share_prefixes,
            )
        self.described = {key: ray.get(actor.describe.remote()) for key, actor in self.actors.items()}

    def target_info(self, name: str, quant: str | None = None):
        from specrouter.core.store import TargetInfo

        info = self.described[LevelSpec(name, None, quant)]
        tokenizer, _ = self.tokenizer(LevelSpec(name, None, quant))
        return TargetInfo(tokenizer, frozenset(info["eos_ids"]), info["max_positions"], info["vocab_size"])

    def tokenizer(self, spec: LevelSpec) -> tuple[object, str]:
        """The model's tokenizer, loaded here (the router maps vocabularies; workers only get masks)."""
        return _tokenizer(spec.model, spec.quant), self.described[model_key(spec)]["fingerprint"]

    def worker(self, spec: LevelSpec, target: str):
        from specrouter.runtime.dataplane import RemoteWorker
        from specrouter.core.store import resolve_skip

        key = model_key(spec)
        name = LevelSpec(spec.model, resolve_skip(spec, functools.partial(_num_layers, spec.model)) or None, spec.quant, spec.task).label
        # The target is waited for while Ray restarts it; a drafter is skipped (the chain shortens).
        wait_s = self.timeout_s if name == target else 2.0
        resolve = functools.partial(_actor_address, self.actors[key], wait_s)
        return RemoteWorker(name, resolve, self.timeout_s, self.described[key])

    def placements(self) -> dict[str, dict]:
        return {key.label: {"node_id": d["node_id"], "pid": d["pid"]} for key, d in self.described.items()}


def _actor_address(actor, wait_s: float) -> str:
    """The actor's data-plane address, waiting up to wait_s while Ray restarts it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(actor.address.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"actor not ready after {wait_s:.0f}s: {exc}") from exc
            time.sleep(0.2)
        except ray.exceptions.RayActorError as exc:
            raise ConnectionError(f"actor died: {exc}") from exc


def release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the kernel: glibc keeps what loading
    freed (a tokenizer's tables, conversion buffers) mapped, and counted in the process's memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


def _data_plane_host() -> str:
    """Loopback on a single-node Ray (nothing is exposed); the node's address on a cluster, so a
    router on another node can reach this worker."""
    if len(ray.nodes()) == 1:
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


@functools.lru_cache(maxsize=None)
def _tokenizer(model: str, quant: str | None):
    from specrouter.core.store import load_tokenizer

    return load_tokenizer(model, quant)


@functools.lru_cache(maxsize=None)
def _num_layers(model: str) -> int:
    from transformers import AutoConfig

    from specrouter.core import catalog

    return AutoConfig.from_pretrained(catalog.resolve(model)).num_hidden_layers


@ray.remote(max_restarts=-1, max_concurrency=16)
class RouterActor:
    """Runs chains over remote workers; the same Engine as in-process, with a RayWorkers provider.
    Requests run together in one continuous batch (a BatchServer thread steps it); other calls
    (info, placements) answer meanwhile. With `adaptive`, the batch's chain and draft lengths are
    chosen every step by the router (`router_config`: its knobs), calibrated at start. `tasks`: a task
    model (specrouter/tasks) whose nearest task names each request's class."""

    def __init__(self, chain: str, dtype: str = "bfloat16", draft_lens: list[int] | None = None,
                 placement: dict[str, dict] | None = None, adaptive: bool = False, default_max_tokens: int = 256,
                 max_batch: int = MAX_BATCH, pipeline: bool = False, draft_confidence: float = 0.0, bit_exact: bool = True,
                 max_waiting: int | None = None, max_waiting_tokens: int | None = None,
                 router_config: RouterConfig = RouterConfig(), retry_down_after_s: float = RETRY_DOWN_AFTER_S,
                 slim_verifier: str | None = None, prefill_chunk: int = PREFILL_CHUNK, tasks: str | None = None,
                 decode_run_s: float = DECODE_RUN_S):
        from specrouter.engine.batch_server import BatchServer
        from specrouter.engine.calibration import router_for
        from specrouter.engine.engine import Engine
        from specrouter.engine.frontend import Frontend
        from specrouter.engine.loop import BatchLoop

        classifier = None
        if tasks is not None:  # first: a missing task model fails the start before any model loads
            from specrouter.tasks.classifier import TaskClassifier

            classifier = TaskClassifier.load(tasks)
        specs = parse_chain(chain)
        slim = slim_spec(slim_verifier, specs[-1]) if slim_verifier else None  # a view on the target's worker actor
        self.provider = RayWorkers(specs + ([slim] if slim else []), dtype, {k: Placement(**v) for k, v in (placement or {}).items()})
        self.engine = Engine(specs, draft_lens=draft_lens, provider=self.provider, draft_confidence=draft_confidence,
                             bit_exact=bit_exact, retry_down_after_s=retry_down_after_s, slim_verifier=slim_verifier)
        self.router = router_for(self.engine, router_config) if adaptive else None
        self.batcher = BatchServer(BatchLoop(self.engine, self.router, max_batch, pipeline, max_waiting, max_waiting_tokens,
                                             prefill_chunk, decode_run_s))
        self.frontend = Frontend(self.engine, self.router, default_max_tokens, batcher=self.batcher, tasks=classifier)
        release_free_memory()

    def stream(self, request, deltas: bool = True):
        """A streaming generator over Frontend.stream (a GenerationRequest), with {"started": True}
        once the request is queued for the batch: bad input (ValueError) and a full queue (Overloaded)
        fail on the first item. ray.cancel() on it stops the generation after the current step and
        frees its state. Callers that stream concurrently need the actor's max_concurrency above the
        batch plus its waiting limit, so that a refusal never waits for a thread.
        `deltas` off (a caller that answers with the whole text): the text after the first piece
        comes as one item before the last, two Ray items a request instead of one a step."""
        items = self.frontend.stream(request)
        yield next(items)
        yield {"started": True}
        first, held = True, None  # without deltas: the text after the first piece, joined
        for item in items:
            if ray.get_runtime_context().is_canceled():  # the client went away: free the workers
                items.close()
                return
            if "text" in item and not deltas and not first:
                held = item if held is None else {"text": held["text"] + item["text"],
                                                  "token_ids": held["token_ids"] + item["token_ids"]}
                continue
            if "text" in item:
                first = False
            elif held is not None:  # the last item
                yield held
            yield item

    def info(self) -> dict:
        return {"chain": ",".join(s.label for s in self.engine.specs), "target": self.engine.target_name,
                "bit_exact_block": self.engine.levels[self.engine.target_name].max_block,
                "max_context": self.engine.max_positions, "kv_pool": asdict(self.engine.kv_pool) if self.engine.kv_pool else None,
                "prefill_chunk": self.batcher.loop.prefill_chunk, "decode_run_s": self.batcher.loop.decode_run_s}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: dict | None = None, seed: int = 0,
                 ignore_eos: bool = False, prompt_class: str | None = None) -> dict:
        """One request through the batch; data_plane_bytes counts every request's traffic meanwhile."""
        from specrouter.core.sampling import SamplingParams

        bytes_before = self._bytes_moved()
        result = self.batcher.generate(prompt_ids, max_new_tokens, SamplingParams(**(sampling or {})), seed, ignore_eos,
                                       prompt_class or "default")
        return {**result.as_dict(), "data_plane_bytes": self._bytes_moved() - bytes_before}

    def _model_levels(self) -> dict:
        """The chain's levels that run a model on a worker (n-gram levels run here), by name."""
        from specrouter.core.levels import ModelLevel

        return {name: level for name, level in self.engine.levels.items() if isinstance(level, ModelLevel)}

    def _bytes_moved(self) -> int:
        return sum(level.worker.bytes_moved for level in self._model_levels().values())

    def placements(self) -> dict:
        return self.provider.placements()

    def actor(self, label: str):
        """The actor handle serving a model (label as in a chain spec, without @skip)."""
        return self.provider.actors[model_key(LevelSpec.parse(label))]

    def describe(self) -> dict:
        """The levels, those down, and the data-plane frames each level's worker sent, by op."""
        frames = {name: dict(level.worker.frames_sent) for name, level in self._model_levels().items()}
        return {"levels": list(self.engine.levels), "down": sorted(self.engine.down), "data_plane_frames": frames}
