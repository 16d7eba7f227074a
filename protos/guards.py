"""Server options and interceptors every kvrelay gRPC server shares: the internal API's secret check, and the
parse guard that turns a request grpc cannot decode (random bytes, invalid UTF-8 in a string field) into
INVALID_ARGUMENT with one log line, instead of the UNKNOWN and multi-line traceback grpc's default deserializers
produce.

Put the secret check first: a refused call then says UNAUTHENTICATED whatever its bytes, and nothing it carries
is looked at beyond the metadata."""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger("kvrelay.grpc")

# The metadata key that carries the deployment's secret on every internal call (router -> workers).
SECRET_METADATA_KEY = "x-kvrelay-secret"
# Options of every kvrelay gRPC server (router and workers).
SERVER_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                  ("grpc.so_reuseport", 0),
                  # the router pings its workers every 10 s, idle or not (router.worker_api): allow it
                  ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                  ("grpc.http2.max_ping_strikes", 0)]


def secret_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates a call to a worker of the deployment whose secret this is."""
    return ((SECRET_METADATA_KEY, secret),)


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `code` without calling the service."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)

    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)


class SecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `x-kvrelay-secret` metadata is not the deployment's secret (compared in constant
    time, so the secret cannot be guessed by timing). A refused call never reaches the service."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the internal API needs a non-empty secret (kvrelay serve generates one)")
        self._secret = secret.encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        given = dict(details.invocation_metadata or ()).get(SECRET_METADATA_KEY)
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._secret):
            return handler
        problem = ("this is kvrelay's internal API: calls need the deployment's secret in the "
                   f"'{SECRET_METADATA_KEY}' metadata" if not given else
                   f"the '{SECRET_METADATA_KEY}' metadata is not this deployment's secret")
        log.warning("refused %s: %s", details.method, problem)
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)


class Undecodable:
    """What the guarded deserializer returns for bytes that are not the method's request message."""

    def __init__(self, error: str) -> None:
        self.error = error


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, UnicodeDecodeError: the client's bytes, not a server fault
            return Undecodable(_one_line(f"{type(e).__name__}: {e}"))

    return parse


class ParseGuardInterceptor(grpc.aio.ServerInterceptor):
    """Gives every request-unary method a deserializer that cannot raise: undecodable bytes end the call with
    INVALID_ARGUMENT "request could not be parsed: ..." and one warning line, and `on_undecodable()` is called
    (the router counts the refusal). A request-streaming method written as an async generator (a decode group's
    Session) gets the same deserializer: an undecodable message is logged the same way and reaches the service
    as an `Undecodable`, which refuses that message only, so one bad message does not end the stream."""

    def __init__(self, on_undecodable: Callable[[], None] | None = None) -> None:
        self.on_undecodable = on_undecodable

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        kw = dict(request_deserializer=_guarded(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
        if handler.request_streaming:
            return self._streaming(handler, method, kw)

        async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
            log.warning("%s: request could not be parsed (%s)", method, request.error)
            if self.on_undecodable is not None:
                self.on_undecodable()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request could not be parsed: {request.error} "
                                f"(send a serialized {method} request message)")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    return await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        stream_inner = handler.unary_stream
        if not inspect.isasyncgenfunction(stream_inner):  # writes through context.write (e.g. health's Watch)

            async def writing(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    return await refuse(request, context)
                return await stream_inner(request, context)

            return grpc.unary_stream_rpc_method_handler(writing, **kw)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(request, context)
                return
            async for item in stream_inner(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(streaming, **kw)

    def _streaming(self, handler: grpc.RpcMethodHandler, method: str, kw: dict) -> grpc.RpcMethodHandler:
        inner = handler.stream_stream
        if inner is None or not inspect.isasyncgenfunction(inner):
            return handler  # kvrelay has none such: grpc's behaviour

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for item in inner(_noted(self, method, requests), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(streaming, **kw)


def _noted(self: ParseGuardInterceptor, method: str, requests: Any) -> Any:
    async def noted() -> Any:
        async for r in requests:
            if isinstance(r, Undecodable):
                log.warning("%s: a message could not be parsed (%s)", method, r.error)
                if self.on_undecodable is not None:
                    self.on_undecodable()
            yield r

    return noted()


def server_interceptors(secret: str | None,
                        on_undecodable: Callable[[], None] | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a kvrelay server: the secret check (internal API) first, then the parse guard
    (`on_undecodable` is called for each request it refuses)."""
    return ([SecretInterceptor(secret)] if secret is not None else []) + [ParseGuardInterceptor(on_undecodable)]
