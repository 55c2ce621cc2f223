"""The serving front: one plain class, `SpecRouterServer`, that answers OpenAI-style HTTP requests and
the public gRPC API (protos/specrouter/v1/specrouter.proto) over a router actor, and keeps metrics.

It is the Ray Serve deployment class (specrouter/serve.py wraps it; its HTTP routes come from
`__serve_build_asgi_app__`) and serves the gRPC API itself on the configured loopback address; tests
use it as is, without Serve.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator

import ray

from specrouter import openai_protocol as oai
from specrouter.config import ServeConfig
from specrouter.request import GenerationRequest
from specrouter.metrics import Metrics
from specrouter.v1 import specrouter_pb2 as pb
from specrouter.v1.specrouter_pb2_grpc import SpecRouterServicer


class SpecRouterServer:
    def __init__(self, config: dict | ServeConfig | None = None):
        from specrouter.runtime import RouterActor, start_local_ray

        self.config = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config or {})
        self.started_ray = start_local_ray()  # inside Serve or a test session: attaches to the running Ray
        self.router = RouterActor.options(num_cpus=0).remote(
            self.config.chain, self.config.dtype, self.config.draft_lens,
            {k: v.model_dump() for k, v in self.config.placement.items()}, self.config.adaptive,
            self.config.default_max_tokens, pipeline=self.config.pipeline, draft_confidence=self.config.draft_confidence,
        )
        self.info = ray.get(self.router.info.remote())
        self.model = self.config.served_name
        self.metrics = Metrics()
        self.grpc = None
        if self.config.grpc_port is not None:
            from specrouter.dataplane import BackgroundServer
            from specrouter.v1.specrouter_pb2_grpc import add_SpecRouterServicer_to_server

            self.grpc = BackgroundServer(GrpcServicer(self), self.config.grpc_host, self.config.grpc_port,
                                         add_SpecRouterServicer_to_server)

    def close(self) -> None:
        """Stop the gRPC server and the router (with its workers)."""
        if self.grpc is not None:
            self.grpc.stop()
        ray.kill(self.router)

    def __serve_build_asgi_app__(self):
        from specrouter.http import build_http_app

        return build_http_app(self)

    # -- generation core ---------------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[dict]:
        """The router's stream for one choice (see RouterActor.stream), with metrics. A ValueError
        from the router is an APIError(400), any other failure (a dead target) an APIError(503)."""
        t0, ttft, final, state = time.perf_counter(), None, None, None
        refs = self.router.stream.options(num_returns="streaming").remote(request)
        try:
            async for ref in refs:
                try:
                    item = await ref
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

    def _requests(self, req: oai._Request, prompt=None, messages=None) -> list[GenerationRequest]:
        if req.model != self.model:
            raise oai.APIError(f"the model {req.model!r} does not exist; this server serves {self.model!r}", 404,
                               param="model", code="model_not_found")
        if req.max_tokens is not None and req.max_tokens > self.info["max_context"]:
            raise oai.APIError(f"max_tokens ({req.max_tokens}) exceeds the context window of {self.info['max_context']}",
                               param="max_tokens")
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        return [
            GenerationRequest(prompt=prompt, messages=messages, max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p, top_k=req.top_k, seed=seed + i, stop=req.stops, ignore_eos=req.ignore_eos,
                              prompt_class=req.prompt_class)
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
        first = self._stream(requests[0])
        try:
            await first.__anext__()  # bad input fails here, before a response starts
        except BaseException:
            await first.aclose()
            raise
        if req.stream:
            return self._sse(req, requests, first, request_id, chat)
        choices, stats, prompt_tokens, completion_tokens = [], [], 0, 0
        for i, request in enumerate(requests):
            stream = first if i == 0 else self._stream(request)
            parts, final = [], {}
            async for item in stream:
                if "text" in item:
                    parts.append(item["text"])
                elif "finish_reason" in item:
                    final = item
            choices.append({"text": "".join(parts), "finish_reason": final["finish_reason"]})
            stats.append(final["stats"])
            prompt_tokens = final["prompt_tokens"]
            completion_tokens += final["completion_tokens"]
        return oai.completion_response(chat, request_id, self.model, choices, oai.usage(prompt_tokens, completion_tokens), stats)

    async def _sse(self, req, requests, first, request_id: str, chat: bool) -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        try:
            for i, request in enumerate(requests):
                stream = first if i == 0 else self._stream(request)
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
        yield b"data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "specrouter",
                                            "root": self.info["target"], "max_model_len": self.info["max_context"],
                                            "chain": self.info["chain"]}]}

    # -- gRPC ------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            body = _grpc_to_openai(request, self.model)
            req = oai.parse(oai.ChatCompletionRequest if request.messages else oai.CompletionRequest, json.dumps(body))
            prompt = None if request.messages else req.prompt
            messages = tuple((m.role, m.text) for m in req.messages) if request.messages else None
            (generation,) = self._requests(req, prompt, messages)
            async for item in self._stream(generation):
                if "text" in item:
                    yield pb.GenerateResponse(text=item["text"], token_ids=item["token_ids"])
                elif "finish_reason" in item:
                    yield pb.GenerateResponse(
                        finish_reason=item["finish_reason"],
                        usage=pb.Usage(**oai.usage(item["prompt_tokens"], item["completion_tokens"])),
                        stats_json=json.dumps(item["stats"]),
                    )
        except oai.APIError as exc:
            if grpc_context is None:
                raise
            _set_grpc_error(grpc_context, exc)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelCard(id=self.model, chain=self.info["chain"],
                                                          max_context=self.info["max_context"])])

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
    return body


def _set_grpc_error(grpc_context, exc: oai.APIError) -> None:
    import grpc

    code = {404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
    grpc_context.set_code(code)
    grpc_context.set_details(exc.message)
