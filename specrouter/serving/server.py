"""The serving front: one plain class, `SpecRouterServer`, that answers OpenAI-style HTTP requests and
the public gRPC API (protos/specrouter/v1/specrouter.proto) over a router actor, and keeps metrics.

It is the Ray Serve deployment class (specrouter/serving/serve.py wraps it; its HTTP routes come from
`__serve_build_asgi_app__`) and serves the gRPC API itself on the configured loopback address; tests
use it as is, without Serve.

The front door: with API keys configured, HTTP (but /health, and /metrics if the config opens it) and
gRPC (but Health) need one (specrouter/serving/auth.py). The router's batch bounds its queue: a request
refused for load is a 429 with Retry-After (gRPC RESOURCE_EXHAUSTED with gRPC's server pushback,
`grpc-retry-pushback-ms`, in the trailing metadata, which the SDK's retry policy honours) before any
response starts, and all of a request's choices are queued before it is answered, so an admitted
request is never dropped for load. A deadline (the body's `timeout`, the gRPC deadline, the config's
request_timeout_s) is enforced by the batch, which frees the request's state on every worker
(408 / DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator

import ray

from specrouter.serving import openai_protocol as oai
from specrouter.serving.auth import ApiKeyInterceptor, check_bearer
from specrouter.serving.client import PUSHBACK_KEY
from specrouter.serving.config import ServeConfig
from specrouter.engine.request import GenerationRequest, Overloaded
from specrouter.serving.metrics import Metrics
from specrouter.v1 import specrouter_pb2 as pb
from specrouter.v1.specrouter_pb2_grpc import SpecRouterServicer


class SpecRouterServer:
    def __init__(self, config: dict | ServeConfig | None = None):
        from specrouter.runtime.actors import RouterActor, start_local_ray

        self.config = c = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config or {})
        self.started_ray = start_local_ray()  # inside Serve or a test session: attaches to the running Ray
        self.router = RouterActor.options(num_cpus=0, max_concurrency=router_concurrency(c)).remote(
            c.chain, c.dtype, c.draft_lens, {k: v.model_dump() for k, v in c.placement.items()}, c.adaptive,
            c.default_max_tokens, max_batch=c.max_batch, pipeline=c.pipeline, draft_confidence=c.draft_confidence,
            bit_exact=c.bit_exact, max_waiting=c.max_waiting_requests, max_waiting_tokens=c.max_waiting_tokens,
            router_config=c.routing.router_config(), retry_down_after_s=c.retry_down_after_s,
            slim_verifier=c.slim_verifier if c.tiered_verification else None, prefill_chunk=c.prefill_chunk_tokens,
            decode_run_s=c.decode_run_s, tasks=c.tasks,
        )
        self.info = ray.get(self.router.info.remote())
        self.model = c.served_name
        self.metrics = Metrics()
        self.keys = c.api_keys
        self.metrics_need_key = bool(self.keys) and c.metrics_need_key is not False
        self.grpc = None
        if c.grpc_port is not None:
            from specrouter.runtime.grpc_server import BackgroundServer
            from specrouter.v1.specrouter_pb2_grpc import add_SpecRouterServicer_to_server

            interceptors = ()
            if self.keys:
                interceptors = (ApiKeyInterceptor(self.keys, frozenset({"/specrouter.v1.SpecRouter/Health"}),
                                                  self.metrics.rejected.labels("unauthenticated").inc),)
            self.grpc = BackgroundServer(GrpcServicer(self), c.grpc_host, c.grpc_port, add_SpecRouterServicer_to_server,
                                         interceptors, c.max_body_bytes)

    def close(self) -> None:
        """Stop the gRPC server and the router (with its workers)."""
        if self.grpc is not None:
            self.grpc.stop()
        ray.kill(self.router)

    def __serve_build_asgi_app__(self):
        from specrouter.serving.http import build_http_app

        return build_http_app(self)

    def authorize(self, authorization: str | None) -> None:
        """Raise APIError(401) unless the `Authorization` header carries a valid key (or none is needed)."""
        refusal = check_bearer(authorization, self.keys)
        if refusal is not None:
            self.metrics.rejected.labels("unauthenticated").inc()
            raise oai.APIError(refusal, 401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- generation core ---------------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest, deltas: bool = True) -> AsyncIterator[dict]:
        """The router's stream for one choice (see RouterActor.stream; `deltas` off: the text after
        its first piece in one item at the end), with metrics. A ValueError
        from the router is an APIError(400), a full queue an APIError(429), a passed deadline an
        APIError(408), any other failure (a dead target) an APIError(503)."""
        t0, ttft, final, state = time.perf_counter(), None, None, None
        refs = self.router.stream.options(num_returns="streaming").remote(request, deltas)
        try:
            async for ref in refs:
                try:
                    item = await ref
                except Overloaded as exc:
                    refusal = getattr(exc, "cause", exc)  # the actor's Overloaded inside Ray's error
                    self.metrics.rejected.labels(refusal.reason).inc()
                    raise oai.APIError(str(refusal), 429, "rate_limit_error", code=refusal.reason,
                                       headers={"Retry-After": str(self.config.retry_after_s)}) from None
                except ValueError as exc:
                    raise oai.APIError(_cause(exc)) from None
                except ray.exceptions.RayError as exc:
                    raise oai.APIError(f"generation failed: {_cause(exc)}", 503, "server_error") from None
                if "started" in item:
                    state = _move(self.metrics, state, self.metrics.running)
                elif state is None:
                    state = _move(self.metrics, state, self.metrics.waiting)  # accepted, queued
                if ttft is None and item.get("text"):
                    ttft = time.perf_counter() - t0
                if item.get("finish_reason") == "timeout":
                    raise oai.APIError(f"the request's deadline ({request.timeout_s:g} s) passed before it finished; "
                                       "its work was cancelled", 408, "timeout_error", code="timeout")
                if "finish_reason" in item:
                    final = item
                yield item
        finally:
            _move(self.metrics, state, None)
            if final is None:
                ray.cancel(refs)  # failed or abandoned (client gone, deadline): stop generating
        if final is not None:
            self.metrics.observe_request(final["stats"], final["prompt_tokens"], final["completion_tokens"],
                                         final["finish_reason"], ttft, time.perf_counter() - t0)

    def _requests(self, req: oai._Request, prompt=None, messages=None, deadline_s: float | None = None) -> list[GenerationRequest]:
        """One GenerationRequest per choice. `deadline_s`: the transport's own deadline (gRPC), if any."""
        if req.model != self.model:
            raise oai.APIError(f"the model {req.model!r} does not exist; this server serves {self.model!r}", 404,
                               param="model", code="model_not_found")
        if req.max_tokens is not None and req.max_tokens > self.info["max_context"]:
            raise oai.APIError(f"max_tokens ({req.max_tokens}) exceeds the context window of {self.info['max_context']}",
                               param="max_tokens")
        asked = req.n * (req.max_tokens or self.config.default_max_tokens)
        if asked > self.config.max_request_tokens:
            raise oai.APIError(f"n x max_tokens ({asked}) exceeds this server's limit of {self.config.max_request_tokens} "
                               "tokens per request", param="max_tokens")
        if req.tiered is not None and not self.config.tiered_verification:
            raise oai.APIError("tiered (lossy) verification is off on this server (ServeConfig tiered_verification)",
                               param="tiered", code="tiered_verification_off")
        tiered = (req.tiered.tau_high, req.tiered.tau_low) if req.tiered is not None and req.tiered.max_disagreement is None else None
        budget = req.tiered.max_disagreement if req.tiered is not None else None
        timeouts = [t for t in (req.timeout, deadline_s, self.config.request_timeout_s) if t is not None]
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        return [
            GenerationRequest(prompt=prompt, messages=messages, max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k, seed=seed + i, stop=req.stops, ignore_eos=req.ignore_eos,
                              prompt_class=req.prompt_class, timeout_s=min(timeouts) if timeouts else None, tiered=tiered,
                              max_disagreement=budget)
            for i in range(req.n)
        ]

    # -- OpenAI HTTP -----------------------------------------------------------------------------------

    async def completions(self, body: bytes) -> dict | AsyncIterator[bytes]:
        req = oai.parse(oai.CompletionRequest, body)
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for completions (chat's is the server's default_max_tokens)
        return await self._complete(req, self._requests(req, prompt=req.prompt, messages=None), chat=False)

    async def chat_completions(self, body: bytes) -> dict | AsyncIterator[bytes]:
        req = oai.parse(oai.ChatCompletionRequest, body)
        messages = tuple((m.role if m.role != "developer" else "system", m.text) for m in req.messages)
        return await self._complete(req, self._requests(req, prompt=None, messages=messages), chat=True)

    async def _complete(self, req: oai._Request, requests: list[GenerationRequest], chat: bool):
        request_id = oai.new_id(chat)
        # every choice runs in the batch at once; a whole-text answer needs no per-step deltas
        streams = [self._stream(request, deltas=req.stream) for request in requests]
        try:
            for stream in streams:
                await stream.__anext__()  # bad input or a full queue fails here, before a response starts
        except BaseException:
            await _close_all(streams)
            raise
        if req.stream:
            return self._sse(req, streams, request_id, chat)
        tasks = [asyncio.ensure_future(_collect(stream)) for stream in streams]
        try:
            finals = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(streams)
            raise
        choices = [{"text": text, "finish_reason": final["finish_reason"]} for text, final in finals]
        usage = oai.usage(finals[0][1]["prompt_tokens"], sum(final["completion_tokens"] for _, final in finals))
        return oai.completion_response(chat, request_id, self.model, choices, usage, [final["stats"] for _, final in finals])

    async def _sse(self, req, streams, request_id: str, chat: bool) -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        try:
            for i, stream in enumerate(streams):  # choice after choice; the later ones run meanwhile
                opened = False
                async for item in stream:
                    if "text" in item and (item["text"] or not opened):
                        yield _event(oai.chunk(chat, request_id, self.model, i, item["text"], first=not opened))
                        opened = True
                    elif "finish_reason" in item:
                        last = oai.chunk(chat, request_id, self.model, i, None, item["finish_reason"], first=not opened)
                        last["specrouter"] = item["stats"]
                        yield _event(last)
                        prompt_tokens = item["prompt_tokens"]
                        completion_tokens += item["completion_tokens"]
            if req.include_usage_chunk:
                yield _event({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                              "created": int(time.time()), "model": self.model, "choices": [],
                              "usage": oai.usage(prompt_tokens, completion_tokens)})
        except oai.APIError as exc:
            yield _event(exc.body())  # the response has started: the error travels in the stream
        finally:
            await _close_all(streams)  # the client went away or a choice failed: stop the others
        yield b"data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "specrouter",
                                            "root": self.info["target"], "max_model_len": self.info["max_context"],
                                            "chain": self.info["chain"], "bit_exact_block": self.info["bit_exact_block"]}]}

    # -- gRPC ------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            body = _grpc_to_openai(request, self.model)
            req = oai.parse(oai.ChatCompletionRequest if request.messages else oai.CompletionRequest, json.dumps(body))
            prompt = None if request.messages else req.prompt
            messages = tuple((m.role, m.text) for m in req.messages) if request.messages else None
            deadline_s = grpc_context.time_remaining() if grpc_context is not None else None
            (generation,) = self._requests(req, prompt, messages, deadline_s)
            async for item in self._stream(generation):
                if "text" in item:
                    yield pb.GenerateResponse(text=item["text"], token_ids=item["token_ids"])
                elif "finish_reason" in item:
                    yield pb.GenerateResponse(
                        finish_reason=item["finish_reason"],
                        usage=pb.Usage(**oai.usage(item["prompt_tokens"], item["completion_tokens"])),
                        stats_json=json.dumps(item["stats"]),
                        lossy=item["stats"].get("lossy", False),
                        **({"tiers": pb.TierCounts(**item["stats"]["tiers"])} if "tiers" in item["stats"] else {}),
                    )
        except oai.APIError as exc:
            if grpc_context is None:
                raise
            _set_grpc_error(grpc_context, exc)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelCard(id=self.model, chain=self.info["chain"], max_context=self.info["max_context"],
                                                          bit_exact_block=self.info["bit_exact_block"])])

    async def Health(self, request: pb.HealthCheckRequest, grpc_context=None) -> pb.HealthCheckResponse:
        try:
            await self.router.info.remote()
            return pb.HealthCheckResponse(ready=True, model=self.model)
        except ray.exceptions.RayError:
            return pb.HealthCheckResponse(ready=False, model=self.model)


class GrpcServicer(SpecRouterServicer):
    """The public gRPC API over a SpecRouterServer."""

    def __init__(self, server: SpecRouterServer):
        self.server = server

    async def Generate(self, request, context):
        async for reply in self.server.Generate(request, context):
            yield reply

    async def ListModels(self, request, context):
        return await self.server.ListModels(request, context)

    async def Health(self, request, context):
        return await self.server.Health(request, context)


def router_concurrency(config: ServeConfig) -> int:
    """Threads of the router actor: one per request generating or waiting (each streams on its own
    thread), and spare ones so that a refusal, health or info call never waits for a thread."""
    waiting = config.max_waiting_requests if config.max_waiting_requests is not None else 4 * config.max_batch
    return config.max_batch + waiting + 8


async def _collect(stream: AsyncIterator[dict]) -> tuple[str, dict]:
    """A choice's whole text and its final item."""
    parts, final = [], {}
    async for item in stream:
        if "text" in item:
            parts.append(item["text"])
        elif "finish_reason" in item:
            final = item
    return "".join(parts), final


async def _close_all(streams: list) -> None:
    for stream in streams:
        await stream.aclose()


def _move(metrics: Metrics, old, new):
    """Move a request from one gauge (waiting / running / none) to another."""
    if old is not None:
        old.dec()
    if new is not None:
        new.inc()
    return new


def _cause(exc: BaseException) -> str:
    cause = exc.as_instanceof_cause() if isinstance(exc, ray.exceptions.RayTaskError) else exc
    return str(cause.args[0]) if cause.args else str(cause)


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _grpc_to_openai(request: pb.GenerateRequest, served: str) -> dict:
    """A gRPC request in OpenAI's request shape, so both faces share one validation."""
    body: dict = {"model": request.model or served, "stop": list(request.stop), "ignore_eos": request.ignore_eos}
    given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
    if sum(given) != 1:
        raise oai.APIError("the prompt is empty or ambiguous: give exactly one of prompt, prompt_token_ids and messages",
                           param="prompt")
    if request.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt or list(request.prompt_token_ids)
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if request.HasField(field):
            body[field] = getattr(request, field)
    if request.prompt_class:
        body["prompt_class"] = request.prompt_class
    if request.HasField("tiered"):  # thresholds (unset: 0), or a quality budget
        given = request.tiered
        body["tiered"] = ({"max_disagreement": given.max_disagreement,
                           **{f: getattr(given, f) for f in ("tau_high", "tau_low") if given.HasField(f)}}
                          if given.HasField("max_disagreement") else {"tau_high": given.tau_high, "tau_low": given.tau_low})
    return body


def _set_grpc_error(grpc_context, exc: oai.APIError) -> None:
    import grpc

    codes = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
             429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
    grpc_context.set_code(codes.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT))
    grpc_context.set_details(exc.message)
    if "Retry-After" in exc.headers:  # gRPC's server pushback: retry after this many milliseconds
        grpc_context.set_trailing_metadata(((PUSHBACK_KEY, str(int(exc.headers["Retry-After"]) * 1000)),))
