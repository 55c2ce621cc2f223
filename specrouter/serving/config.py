"""The serving configuration (YAML / Serve application args), validated at the edge with pydantic.

    chain: "ngram,qwen2.5-coder-1.5b@gguf"   # drafters smallest first, target last
    dtype: bfloat16
    draft_lens: [6]                  # optional, one per drafter level
    draft_confidence: 0.0            # a drafting model ends its block after a token it gave less than this
    adaptive: false                  # true: --chain is a pool and each step runs the best chain
    pipeline: false                  # true: draft the next block while the target verifies (PipeSpec-style)
    model_name: null                 # the served model id (default: the target's name)
    default_max_tokens: 256          # when a chat request gives no max_tokens
    grpc_host: 127.0.0.1             # the public gRPC API; null port disables it
    grpc_port: 9000
    api_key: null                    # one key or a list; default: $SPECROUTER_API_KEY (comma-separated)
    api_key_file: null               # a file of keys, one a line
    max_batch: 16                    # requests generating together
    prefill_chunk_tokens: 512        # the most prompt tokens a step prefills; longer prompts take several steps
    decode_run_s: 0.1                # plain decoding runs passes back to back on the target for this long a call
    retry_down_after_s: 5.0          # a drafter that stopped answering is left out of chains this long
    routing: {explore_every: 12}     # the adaptive router's knobs (see RoutingConfig)
    max_waiting_requests: 64         # past it, a request that would wait is refused at once (429)
    max_waiting_tokens: null         # the same, counting the waiting requests' prompt tokens
    placement:                       # per model label (name or name@int8), or "*"
      qwen2.5-coder-1.5b: {num_gpus: 1, accelerator_type: A100, device: cuda}
      "*": {kv_cache_tokens: 8192}   # a llama.cpp model's KV cache, all its sequences together
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from specrouter.core.spec import parse_chain
from specrouter.engine.defaults import DECODE_RUN_S, MAX_BATCH, PREFILL_CHUNK, RETRY_DOWN_AFTER_S
from specrouter.routing.config import MAX_DRAFT_LEN, RouterConfig

# The default for CPU serving: the target's own GGUF on llama.cpp (its quantised kernels outrun a torch
# bf16 target on CPU), with prompt lookup below it, which drafts where the target verifies blocks
# bit-exactly (and, with bit_exact off, pays on answers that repeat the prompt).
DEFAULT_CHAIN = "ngram,qwen2.5-coder-1.5b@gguf"
API_KEY_ENV = "SPECROUTER_API_KEY"


def _env_keys() -> list[SecretStr]:
    return [SecretStr(k.strip()) for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]


def _check_keys(keys: list[SecretStr]) -> list[SecretStr]:
    for key in keys:
        text = key.get_secret_value()
        if not text or not text.isascii() or not text.isprintable() or " " in text:
            raise ValueError("an API key must be non-empty printable ASCII without spaces")
    return keys


class PlacementConfig(BaseModel):
    """Where one model's Ray actor runs, and with what."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs the model's actor reserves in Ray.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs the model's actor reserves in Ray.")
    accelerator_type: str | None = Field(
        default=None, description="A Ray accelerator type the actor's node must have (e.g. A100). null: any.")
    resources: dict[str, float] = Field(
        default={}, description="Custom Ray resources the actor reserves (e.g. {accel_large: 1}).")
    torch_threads: int | None = Field(
        default=None, ge=1, description="Threads of the model's torch or llama.cpp computation. null: the default.")
    device: str = Field(default="cpu", description="The torch device the model runs on (cpu, cuda, cuda:1).")
    env: dict[str, str] = Field(default={}, description="Extra environment of the model's actor (e.g. OMP_WAIT_POLICY); "
                                "its process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages) unless this sets that tunable.")
    kv_cache_tokens: int | None = Field(
        default=None, ge=64, description="Positions of a llama.cpp model's KV cache, all its sequences together (like "
        "llama-server's --ctx-size): requests join the batch while theirs fit, and none may exceed it. null: 16384.")
    share_prefixes: bool = Field(
        default=True, description="Whether a llama.cpp model's sequences share the cells of the prompt tokens they begin "
        "with alike (a chat template's system prompt, a conversation's earlier turns), running only the rest, as "
        "llama-server's prompt cache does. A prompt's remaining rows then run in a narrower pass, which may round "
        "differently: false makes every request's greedy output independent of the requests before it.")


class RoutingConfig(BaseModel):
    """The adaptive router's knobs (with `adaptive`; specrouter/routing/router.py)."""

    model_config = ConfigDict(extra="forbid")
    replan_every: int = Field(default=RouterConfig.replan_every, ge=1,
                              description="Steps a request running alone keeps its plan before it is planned again.")
    hysteresis: float = Field(default=RouterConfig.hysteresis, ge=0.0, lt=1.0,
                              description="A request running alone switches plans only to one predicted at least this "
                                          "fraction faster than its own (a new request: than its class's last plan).")
    explore_every: int = Field(default=RouterConfig.explore_every, ge=0,
                               description="Steps after which a drafter (else a pair of levels) not measured since is "
                                           "measured again: run once, or timed with one small pass. 0: never.")
    explore_margin: float = Field(default=RouterConfig.explore_margin, ge=1.0,
                                  description="A stale level's best plan is run to measure it only if predicted at "
                                              "most this many times slower than the best plan.")
    batch_speculation_margin: float = Field(default=RouterConfig.batch_speculation_margin, ge=0.0, lt=1.0,
                                            description="A batch of two or more requests speculates only if predicted "
                                                        "at least this fraction faster than plain batched decoding.")
    max_drafters: int = Field(default=RouterConfig.max_drafters, ge=0, description="The most drafters in a chain.")
    lengths: tuple[int, ...] = Field(default=RouterConfig.lengths, min_length=1,
                                     description="The draft lengths the router searches.")
    lookup_lengths: tuple[int, ...] = Field(
        default=RouterConfig.lookup_lengths, min_length=1,
        description="The draft lengths the router searches for prompt lookup (`ngram`, `ngram:N`), whose long "
                    "matches go on for dozens of tokens: they pay where a wide pass costs much less a token than "
                    "a narrow one (llama.cpp).")

    @field_validator("lengths", "lookup_lengths")
    @classmethod
    def _positive_lengths(cls, lengths: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= g <= MAX_DRAFT_LEN for g in lengths):
            raise ValueError(f"draft lengths must be from 1 to {MAX_DRAFT_LEN}, got {list(lengths)}")
        return tuple(sorted(set(lengths)))

    def router_config(self) -> RouterConfig:
        return RouterConfig(**self.model_dump())


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # errors never echo an API key
    chain: str = Field(
        default=DEFAULT_CHAIN,
        description="The levels, comma-separated: drafters smallest first, the target last (specrouter/core/spec.py). "
                    "With `adaptive`, the pool the router picks chains from.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="The dtype of torch levels (llama.cpp levels run their GGUF's own types).")
    draft_lens: list[int] | None = Field(
        default=None, description="The block length each drafter level proposes, bottom first. null: 4 per level (16 for "
                                   "ngram:N, 10 for a bottom model when draft_confidence is set).")
    draft_confidence: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="A drafting model ends its block after a token it gave less than this probability, so a "
                    "block length becomes a cap. 0: fixed blocks.")
    bit_exact: bool = Field(
        default=True,
        description="A target whose wider passes differ in rounding from one-token passes (a llama.cpp level, "
                    "measured at load; @w8/@w4 torch levels: 16 tokens) verifies blocks no longer than it "
                    "verifies bit-exactly, so greedy output equals the target's alone token for token. "
                    "false: longer blocks, faster, equal up to rounding.")
    tiered_verification: bool = Field(
        default=False,
        description="Let requests ask for tiered verification (`tiered`: tau_high, tau_low), a lossy mode: drafted "
                    "tokens the drafter was sure of are committed unchecked, medium ones checked by a slim verifier. "
                    "Such responses say `lossy: true`. false: every request is lossless (a tiered one is a 400).")
    slim_verifier: str | None = Field(
        default="@skip",
        description="Tiered verification's slim verifier: the target with skipped layers, as `NAME@skip:L1+L2` or its "
                    "modifier alone (`@skip:12+13`; `@skip`: the set measured for this role, else the target's default slim set; "
                    "none for a llama.cpp target, which has no skip-layer view). null: none, the target checks medium tokens too.")
    adaptive: bool = Field(
        default=False, description="Treat `chain` as a pool: before every step the router picks the chain and "
                                   "the block lengths predicted fastest (docs/routing.md).")
    pipeline: bool = Field(
        default=False, description="Draft the next block while the target verifies the current one.")
    tasks: str | None = Field(
        default=None,
        description="A task model (`specrouter tasks fit`; \"default\": the one it chose; or a task model's .json) "
                    "whose nearest task is each request's class, so the router keeps acceptance tables per discovered "
                    "task; responses report the task, the prompt's distance to its centroid and the ms classing took. "
                    "A request's own prompt_class still wins. null: the lexical classifier (code, summarization, chat).")
    model_name: str | None = Field(default=None, description="The model id clients name. null: the target's name.")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens of a chat request that gives none.")
    grpc_host: str = Field(
        default="127.0.0.1", description="The address the public gRPC API (protos/specrouter/v1/specrouter.proto) binds.")
    grpc_port: int | None = Field(default=9000, ge=0, description="The public gRPC API's port. 0: any free port; null: no gRPC.")
    placement: dict[str, PlacementConfig] = Field(
        default={}, description="Per model label (a level's name, e.g. qwen2.5-coder-1.5b or NAME@int8) or \"*\": "
                                "where its actor runs (the placement fields below).")
    # -- the front door: keys, admission, limits --
    api_key: list[SecretStr] = Field(
        default_factory=_env_keys,
        description="API keys (one or a list); when any is set, every HTTP route but /health needs "
                    "`Authorization: Bearer KEY` and the gRPC API (but Health) the same in its metadata. "
                    f"Default: ${API_KEY_ENV}, comma-separated. Never logged: shown as '**********'.")
    api_key_file: Path | None = Field(
        default=None,
        description="A file of API keys, one a line ('#' comments); read when the config is validated, its "
                    "keys join api_key (so the file need only exist where the config is first read).")
    metrics_need_key: bool | None = Field(
        default=None,
        description="Whether /metrics needs the API key (when keys are set). null: open when `specrouter "
                    "serve` binds HTTP to loopback, keyed otherwise.")
    max_batch: int = Field(default=MAX_BATCH, ge=1, description="The most requests generating together in the batch.")
    prefill_chunk_tokens: int = Field(
        default=PREFILL_CHUNK, ge=1,
        description="The most prompt tokens one step prefills. A longer prompt is prefilled in chunks of this many "
                    "tokens over several steps while the batch goes on decoding: smaller chunks keep the other "
                    "requests' inter-token latency lower while long prompts arrive, larger ones give the long "
                    "prompt its first token sooner.")
    decode_run_s: float = Field(
        default=DECODE_RUN_S, ge=0.0,
        description="Seconds one call to the target may run plain decoding (a step that drafts nothing): "
                    "one-token passes back to back, the same passes as one a step, each sampled token drawn by its "
                    "position's generator either way, so the output is the same; the router, the data plane and the "
                    "stream then work once per run instead of once per token, and tokens arrive a run at a time. "
                    "0: one token a step.")
    retry_down_after_s: float = Field(
        default=RETRY_DOWN_AFTER_S, ge=0.0,
        description="How long a drafter that stopped answering is left out of chains before it is tried again "
                    "(the target's requests go on without it meanwhile).")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="The adaptive router's knobs (with `adaptive`).")
    max_waiting_requests: int | None = Field(
        default=64, ge=0,
        description="The most requests that may wait for a place in a full batch; past it a new request is "
                    "refused at once (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED). null: no limit.")
    max_waiting_tokens: int | None = Field(
        default=None, ge=0,
        description="The most prompt tokens the waiting requests may hold together; past it, refused as above. "
                    "null: no limit.")
    retry_after_s: int = Field(
        default=1, ge=1, description="Seconds a client refused for load is told to wait: HTTP Retry-After, gRPC "
                                     "server pushback (grpc-retry-pushback-ms).")
    max_body_bytes: int = Field(default=4 << 20, ge=1024,
                                description="The largest HTTP request body (bytes; larger: 413) and gRPC message.")
    request_timeout_s: float | None = Field(
        default=None, gt=0,
        description="The longest a request may run, queued or generating; a request's own `timeout` (HTTP "
                    "body) or gRPC deadline may only shorten it. When it passes, the request's work is "
                    "cancelled on every worker (HTTP 408, gRPC DEADLINE_EXCEEDED). null: no limit.")
    max_request_tokens: int = Field(default=32768, ge=1,
                                    description="The most tokens one request may ask for: n x max_tokens (larger: 400).")

    @field_validator("api_key", mode="before")
    @classmethod
    def _one_or_many_keys(cls, value):
        return [value] if isinstance(value, (str, SecretStr)) else value

    @field_validator("api_key")
    @classmethod
    def _keys_are_tokens(cls, keys: list[SecretStr]) -> list[SecretStr]:
        _check_keys(keys)
        return keys

    @model_validator(mode="after")
    def _chain_parses(self):
        specs = parse_chain(self.chain)  # ValueError -> a validation error naming the chain
        if self.draft_lens is not None and len(self.draft_lens) != len(specs) - 1:
            raise ValueError(f"draft_lens needs one length per drafter ({len(specs) - 1}), got {self.draft_lens}")
        return self

    @model_validator(mode="after")
    def _read_key_file(self):
        if self.api_key_file is not None:
            try:
                text = Path(self.api_key_file).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read the API key file {self.api_key_file}: {exc.strerror}") from None
            lines = (line.strip() for line in text.splitlines())
            keys = [line for line in lines if line and not line.startswith("#")]
            if not keys:
                raise ValueError(f"the API key file {self.api_key_file} holds no key")
            self.api_key = _check_keys([*self.api_key, *map(SecretStr, keys)])
            self.api_key_file = None  # read once: a copy of this config (a Serve replica's) needs no file
        return self

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        """The keys as bytes, for constant-time comparison (specrouter/serving/auth.py)."""
        return tuple(dict.fromkeys(k.get_secret_value().encode() for k in self.api_key))

    @property
    def served_name(self) -> str:
        """The model id clients name: the target's model, whichever backend runs it."""
        return self.model_name or parse_chain(self.chain)[-1].model

    @classmethod
    def from_file(cls, path: str | Path) -> "ServeConfig":
        import yaml

        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
