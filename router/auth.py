"""API-key checks for both public fronts: `Authorization: Bearer KEY` on HTTP, the same as gRPC metadata. A
missing or wrong key is refused before anything else is done (UNAUTHENTICATED / 401); health stays open, so
load balancers and probes need no key."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protos.guards import refusing_handler
from router.errors import UNAUTHENTICATED

# gRPC methods any caller may use: the health service (probes, load balancers).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)


def check_key(authorization: str | None, key: str) -> str | None:
    """None when `authorization` (the header's value) carries `key`; else why not, saying what to send."""
    if not authorization:
        return "this server needs an API key: send the header 'Authorization: Bearer <key>'"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return "the Authorization header must be 'Bearer <key>'"
    if not hmac.compare_digest(given.strip().encode(), key.encode()):  # constant time: no key guessing by timing
        return "the API key is not valid: check the key this server was started with"
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health's without the key in its `authorization` metadata; `on_refused(status)`
    counts the refusal (the router's metrics)."""

    def __init__(self, key: str, on_refused: Callable[[str], None] | None = None) -> None:
        self.key, self.on_refused = key, on_refused

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        problem = check_key(metadata.get("authorization"), self.key)
        if problem is None:
            return handler
        if self.on_refused is not None:
            self.on_refused(UNAUTHENTICATED)
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
