"""The one way a worker RPC starts a request on its engine: check the call, start it between two steps, follow
its outputs, and turn whatever goes wrong into a gRPC status with a one-line message (a traceback goes to the
log, never to the caller). Prefill (a call per request) and a decode group's session commands (many requests on
one stream, `decode_workers.session`) all start here, so a failure of the same kind gets the same status on every
worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import grpc

from engine.engine_loop import EngineDead
from engine.outputs import RequestOutput
from protos.codec import one_line
from worker_runtime.handle import EngineHandle

log = logging.getLogger("kvrelay.worker")
R = TypeVar("R")


class Refusal(Exception):
    """A call refused with `code`: raised by a service's checks, or by its start function on the engine loop
    (e.g. RESOURCE_EXHAUSTED when no KV blocks are free). `message` says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message` cut to one line."""
    await context.abort(code, one_line(message))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


@dataclass
class Started(Generic[R]):
    """A request the engine took: what its start function returned, and the queue its outputs arrive on (on
    the server's loop, once per step)."""

    request_id: str
    value: R
    outputs: asyncio.Queue[RequestOutput]


async def start(who: str, loop: EngineHandle, parse: Callable[[], tuple[str, tuple]], op: str,
                sink: Callable[[RequestOutput], None],
                refusal: Callable[[Any], Refusal | None] | None = None) -> tuple[str, Any] | Refusal:
    """(request id, what `op` returned) of a started request, or the Refusal that says why it did not start
    (nothing of it is left on the engine then). `parse()` checks the call and gives (request id, arguments):
    ValueError is INVALID_ARGUMENT, a Refusal its own status; nothing reaches the engine before it passed.
    Engine operation `op(request id, *arguments)` then runs on the engine loop between steps and adds or
    reserves the request; `sink` is subscribed to its outputs in the same call, so none is missed. `refusal(value)`,
    if given, may turn what `op` returned into a Refusal (e.g. RESOURCE_EXHAUSTED when it reserved nothing).
    There ValueError is INVALID_ARGUMENT (the engine's own checks), a Refusal its status, EngineDead and anything
    else UNAVAILABLE ("`who`: cause"; unexpected ones logged with their traceback). A caller cancelled meanwhile
    leaves nothing behind: the request is aborted."""
    try:
        rid, args = parse()
    except Refusal as e:
        return e
    except ValueError as e:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    try:
        value = await loop.astart(rid, sink, op, rid, *args)
        refused = refusal(value) if refusal is not None else None
        if refused is not None:
            loop.unsubscribe(rid)
            return refused
    except Refusal as e:
        return e
    except EngineDead as e:
        return Refusal(grpc.StatusCode.UNAVAILABLE, f"{who}: {e}")
    except ValueError as e:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:  # e.g. a rank could not register the transfer: the worker's fault, not the caller's
        log.exception("%s: starting request %s failed", who, rid)
        return Refusal(grpc.StatusCode.UNAVAILABLE, f"{who}: {type(e).__name__}: {e}")
    return rid, value


async def start_request(context: grpc.aio.ServicerContext, who: str, loop: EngineHandle,
                        parse: Callable[[], tuple[str, tuple]], op: str,
                        refusal: Callable[[Any], Refusal | None] | None = None) -> Started:
    """`start` for a call of its own (one request per call): a Refusal ends the call with its status; the
    outputs arrive on the returned queue (delivered on this server's loop, `deliver_on`)."""
    outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
    started = await start(who, loop, parse, op, outputs.put_nowait, refusal)
    if isinstance(started, Refusal):
        await refuse(context, started.code, started.message)
    rid, value = started
    return Started(rid, value, outputs)


async def follow(loop: EngineHandle, started: Started) -> AsyncIterator[list[RequestOutput]]:
    """The request's outputs until its finished one, in batches: everything that arrived while the caller
    handled the last batch (under load, fewer and larger messages; when idle, each step's output at once). If
    the caller stops early (the router cancelled: client gone, stop string, deadline), the request is aborted,
    so its blocks are freed now."""
    finished = False
    try:
        while not finished:
            batch = [await started.outputs.get()]
            while not batch[-1].finished and not started.outputs.empty():
                batch.append(started.outputs.get_nowait())
            finished = batch[-1].finished
            yield batch
    finally:
        if not finished:
            loop.call("abort_request", started.request_id)
