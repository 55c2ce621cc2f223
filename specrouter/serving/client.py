"""The gRPC client SDK for SpecRouter's public API (protos/specrouter/v1/specrouter.proto).

    from specrouter import Client
    with Client("127.0.0.1:9000") as client:
        print(client.generate("def fib(n):", max_tokens=32, temperature=0).text)
        for chunk in client.stream("def fib(n):", max_tokens=32):
            print(chunk.text, end="")

`AsyncClient` has the same methods as coroutines / async iterators. Every call takes a deadline
(`timeout` seconds, retries included; the server cancels the work when it passes). Retries are gRPC's
own (the channel's service config, from `RetryPolicy`): a call that failed with UNAVAILABLE or
RESOURCE_EXHAUSTED before any response arrived is tried again with exponential backoff, or after the
time the server asks for in its `grpc-retry-pushback-ms` trailer (its queue is full); a stream that
has started is never retried. gRPC errors become the exceptions below. `api_key=` sends
`authorization: Bearer KEY` with every call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from specrouter.v1 import specrouter_pb2 as pb
from specrouter.v1.specrouter_pb2_grpc import SpecRouterStub

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's server pushback: the delay (ms) before the next attempt


class SpecRouterError(Exception):
    """A call failed; `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidRequest(SpecRouterError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(SpecRouterError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(SpecRouterError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SpecRouterError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SpecRouterError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(SpecRouterError):
    """The server's queue was full every time the call was tried; `retry_after_s` is its last advice."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s: float | None = None


_ERRORS = {cls.code: cls for cls in (InvalidRequest, ModelNotFound, Unavailable, DeadlineExceeded, Unauthenticated, Overloaded)}


def _error(exc: grpc.RpcError) -> SpecRouterError:
    retry_after = _pushback_s(exc)
    cls = _ERRORS.get(exc.code(), SpecRouterError)
    if cls is Overloaded and retry_after is None:
        cls = SpecRouterError  # RESOURCE_EXHAUSTED from the transport (a message too large), not the queue
    error = cls(f"{exc.code().name}: {exc.details()}")
    error.code = exc.code()
    if isinstance(error, Overloaded):
        error.retry_after_s = retry_after
    return error


def _pushback_s(exc: grpc.RpcError) -> float | None:
    """The server's pushback (seconds) in the call's trailing metadata, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            try:
                return max(0, int(value)) / 1000
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for every method of the API. `attempts` counts the first try (1: no retries;
    gRPC allows at most 5). The n-th retry waits a random time up to
    min(first_backoff_s * multiplier^(n-1), max_backoff_s), or the server's pushback when it sends one."""

    attempts: int = 4
    first_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self):
        if not 1 <= self.attempts <= 5:
            raise ValueError(f"attempts must be between 1 and 5 (gRPC's limit), not {self.attempts}")
        if self.first_backoff_s <= 0 or self.max_backoff_s <= 0 or self.multiplier <= 0:
            raise ValueError("backoffs and the multiplier must be positive")

    def service_config(self) -> str:
        """The channel's service config (JSON) carrying this policy."""
        method: dict = {"name": [{"service": "specrouter.v1.SpecRouter"}]}
        if self.attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.attempts,
                "initialBackoff": f"{self.first_backoff_s:.9f}s",
                "maxBackoff": f"{self.max_backoff_s:.9f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            }
        return json.dumps({"methodConfig": [method]})

    def channel_options(self) -> list[tuple[str, str | int]]:
        # The policy is the channel's own: a service config from DNS never replaces it.
        return [("grpc.service_config", self.service_config()), ("grpc.service_config_disable_resolution", 1)]


@dataclass
class Chunk:
    text: str
    token_ids: list[int]


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: dict = field(default_factory=dict)  # chain, per-level acceptance, routing
    lossy: bool = False  # the output may differ from the target's (tiered verification)
    tiers: dict | None = None  # with tiered verification: the committed tokens each tier decided

    def add(self, reply: pb.GenerateResponse) -> Chunk | None:
        """Fold one streamed reply in; returns its text chunk, or None for the final reply."""
        if reply.finish_reason:
            self.finish_reason = reply.finish_reason
            self.prompt_tokens, self.completion_tokens = reply.usage.prompt_tokens, reply.usage.completion_tokens
            self.stats = json.loads(reply.stats_json) if reply.stats_json else {}
            self.lossy = reply.lossy
            if reply.HasField("tiers"):
                self.tiers = {"tier1_tokens": reply.tiers.tier1_tokens, "tier2_tokens": reply.tiers.tier2_tokens,
                              "tier3_tokens": reply.tiers.tier3_tokens, "slim_rejections": reply.tiers.slim_rejections}
            return None
        self.text += reply.text
        self.token_ids.extend(reply.token_ids)
        return Chunk(reply.text, list(reply.token_ids))


def make_request(prompt: str | list[int] | None = None, messages: list[dict] | None = None, *, model: str = "",
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: list[str] | str | None = None,
                 ignore_eos: bool = False, prompt_class: str = "", tiered: tuple[float, float] | None = None,
                 max_disagreement: float | None = None) -> pb.GenerateRequest:
    """`tiered`: (tau_high, tau_low) for tiered (lossy) verification, or `max_disagreement`, a quality
    budget the server calibrates them by; neither: lossless."""
    request = pb.GenerateRequest(model=model, stop=[stop] if isinstance(stop, str) else list(stop or []),
                                 ignore_eos=ignore_eos, prompt_class=prompt_class)
    if tiered is not None:
        request.tiered.tau_high, request.tiered.tau_low = tiered
    if max_disagreement is not None:
        request.tiered.max_disagreement = max_disagreement
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.extend(prompt)
    for m in messages or []:
        request.messages.add(role=m["role"], content=m["content"])
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    return request


def _model_card(card: pb.ModelCard) -> dict:
    """A served model as a dict; `bit_exact_block`: the most drafted tokens its target verifies
    bit-exactly (None: any)."""
    return {"id": card.id, "chain": card.chain, "max_context": card.max_context,
            "bit_exact_block": card.bit_exact_block if card.HasField("bit_exact_block") else None}


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    def __init__(self, address: str = "127.0.0.1:9000", timeout: float = 300.0, retry: RetryPolicy = RetryPolicy(),
                 api_key: str | None = None):
        self.timeout, self.retry, self._metadata = timeout, retry, _metadata(api_key)
        self.channel = grpc.insecure_channel(address, options=retry.channel_options())
        self.stub = SpecRouterStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def stream(self, prompt=None, messages=None, *, timeout: float | None = None, **params) -> Iterator[Chunk]:
        """Text chunks as they are generated."""
        completion = Completion()
        yield from (c for c in self._replies(make_request(prompt, messages, **params), timeout, completion) if c)

    def generate(self, prompt=None, messages=None, *, timeout: float | None = None, **params) -> Completion:
        completion = Completion()
        for _ in self._replies(make_request(prompt, messages, **params), timeout, completion):
            pass
        return completion

    def _replies(self, request, timeout, completion: Completion) -> Iterator[Chunk | None]:
        try:
            for reply in self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata):
                yield completion.add(reply)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def list_models(self, timeout: float | None = None) -> list[dict]:
        reply = self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_card(m) for m in reply.models]

    def health(self, timeout: float | None = None) -> bool:
        return self._unary(self.stub.Health, pb.HealthCheckRequest(), timeout).ready


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:9000", timeout: float = 300.0, retry: RetryPolicy = RetryPolicy(),
                 api_key: str | None = None):
        self.timeout, self.retry, self._metadata = timeout, retry, _metadata(api_key)
        self.channel = grpc.aio.insecure_channel(address, options=retry.channel_options())
        self.stub = SpecRouterStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def stream(self, prompt=None, messages=None, *, timeout: float | None = None, **params) -> AsyncIterator[Chunk]:
        async for chunk in self._replies(make_request(prompt, messages, **params), timeout, Completion()):
            if chunk is not None:
                yield chunk

    async def generate(self, prompt=None, messages=None, *, timeout: float | None = None, **params) -> Completion:
        completion = Completion()
        async for _ in self._replies(make_request(prompt, messages, **params), timeout, completion):
            pass
        return completion

    async def _replies(self, request, timeout, completion: Completion) -> AsyncIterator[Chunk | None]:
        try:
            async for reply in self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata):
                yield completion.add(reply)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def list_models(self, timeout: float | None = None) -> list[dict]:
        reply = await self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)
        return [_model_card(m) for m in reply.models]

    async def health(self, timeout: float | None = None) -> bool:
        return (await self._unary(self.stub.Health, pb.HealthCheckRequest(), timeout)).ready
