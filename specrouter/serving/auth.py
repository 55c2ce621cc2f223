"""API keys at the front door: `Authorization: Bearer KEY` on HTTP, the same in gRPC metadata.

A presented key is compared with every configured key in constant time (hmac.compare_digest, all of
them, whichever matches), so the time a refusal takes tells nothing about the keys. Refusals say
only that a key is missing or wrong, never which key was sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

MISSING = "no API key: send the header `Authorization: Bearer KEY`"
WRONG = "the API key is not valid"


def check_bearer(authorization: str | None, keys: tuple[bytes, ...]) -> str | None:
    """None if the request may pass (no keys configured, or one matches), else why not (MISSING / WRONG)."""
    if not keys:
        return None
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return MISSING
    presented = token.strip().encode("utf-8", "replace")
    matches = [hmac.compare_digest(presented, key) for key in keys]
    return None if any(matches) else WRONG


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid key (UNAUTHENTICATED) except `open_methods` (health probes,
    like HTTP's /health). `on_refusal` runs once per refused call (a metric)."""

    def __init__(self, keys: tuple[bytes, ...], open_methods: frozenset[str] = frozenset(),
                 on_refusal: Callable[[], None] = lambda: None):
        self.keys, self.open_methods, self.on_refusal = keys, open_methods, on_refusal

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method not in self.open_methods:
            metadata = dict(details.invocation_metadata or ())
            refusal = check_bearer(metadata.get("authorization"), self.keys)
            if refusal is not None:
                self.on_refusal()
                return _refuse(grpc.StatusCode.UNAUTHENTICATED, refusal)
        return await continuation(details)


def _refuse(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `code` (a unary handler ends a call of any kind)."""

    async def abort(request, context):
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(abort)
