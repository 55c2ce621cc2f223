"""The HTTP face of a SpecRouterServer: OpenAI's routes, /metrics (Prometheus) and /health.

Bodies are read raw (at most the config's max_body_bytes: larger is a 413) and validated by
specrouter/serving/openai_protocol.py, so every bad request, down to invalid UTF-8, gets a 4xx in OpenAI's
error shape; nothing a client sends can take the server down. With API keys configured, every route
but /health (and /metrics, if the config opens it) needs `Authorization: Bearer KEY` (else 401).
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from specrouter.serving.openai_protocol import APIError

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(f"the request body exceeds this server's limit of {limit} bytes", 413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def build_http_app(server) -> FastAPI:
    app = FastAPI(title="SpecRouter", docs_url=None, redoc_url=None)

    async def require_key(request: Request):
        server.authorize(request.headers.get("authorization"))

    keyed = [Depends(require_key)]

    async def body(request: Request) -> bytes:
        return await read_body(request, server.config.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        error = APIError(str(exc.detail), exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(f"internal error: {exc}", 500, "server_error").body(), status_code=500)

    async def respond(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        return await respond(await server.completions(await body(request)))

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        return await respond(await server.chat_completions(await body(request)))

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return server.models()

    @app.get("/metrics", dependencies=keyed if server.metrics_need_key else [])
    async def metrics():
        return Response(server.metrics.exposition(), media_type=server.metrics.content_type)

    @app.get("/health")
    async def health():
        reply = await server.Health(None)
        return JSONResponse({"ready": reply.ready, "model": reply.model}, status_code=200 if reply.ready else 503)

    return app
