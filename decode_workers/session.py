"""One router's session with a decode group: all of its requests on one stream (`DecodeGroup.Session`).

Commands come in batches (`SessionCommands`); each starts, feeds or cancels one request, and one that cannot be
carried out refuses only its request (a `refused` event with the status a call of its own would have had). Back
goes one `SessionEvents` per engine step: the engine hands a step's outputs of every request over in one callback
(`EngineHandle.deliver_on`), the sinks buffer them here, and the writer sends what has piled up as one message
once the callback is done (or, while the router reads slowly, what piled up during the previous write). A
request's outputs of one message are coalesced into one `tokens` event.

Whatever ends the session (the router's stream ends, breaks or is cancelled; the engine dies) aborts every
request it still has, so no blocks stay held."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from engine.engine_loop import EngineDead
from engine.outputs import RequestOutput
from protos import codec
from protos import worker_pb2 as wpb
from protos.guards import Undecodable
from worker_runtime.rpc import Refusal, start

if TYPE_CHECKING:
    from decode_workers.service import DecodeService

log = logging.getLogger("kvrelay.worker")
# After the engine died, the session waits this long at most for the abort outputs of its requests to be sent
# before it ends (they normally come at once, with the death).
DEATH_FLUSH_S = 2.0


class Session:
    """Mutates: its live requests and the events not sent yet. Runs on the server's asyncio loop only."""

    def __init__(self, service: DecodeService, context: grpc.aio.ServicerContext) -> None:
        self.service, self.context, self.loop = service, context, service.loop
        self.who = f"decode group {service.name}"
        # request id -> its start task while it starts, None once the engine has it; gone once finished, refused
        # or cancelled (later outputs of a cancelled request are dropped).
        self.live: dict[str, asyncio.Task | None] = {}
        self._entries: list[wpb.SessionEvent | str] = []  # events to send; a request id: its buffered outputs
        self._outputs: dict[str, list[RequestOutput]] = {}
        self._ready = asyncio.Event()  # set when there is something to send, or the router's stream ended
        self._tasks: set[asyncio.Task] = set()  # first tokens on their way to the engine (held: not collected)
        self._ended = False

    async def run(self, commands: AsyncIterator[wpb.SessionCommands | Undecodable]
                  ) -> AsyncIterator[wpb.SessionEvents]:
        reader = asyncio.ensure_future(self._read(commands))
        try:
            while True:
                timeout = DEATH_FLUSH_S if self.loop.error is not None else None
                try:
                    await asyncio.wait_for(self._ready.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                self._ready.clear()
                msg = self._take()
                if msg.events:
                    yield msg  # awaits the write: meanwhile the next steps' events pile up for one message
                if self._ended:
                    return
                if self.loop.error is not None and (timeout is not None or not self._started()):
                    # Every request had its abort finish sent: the router sees the group lost.
                    await self.context.abort(grpc.StatusCode.UNAVAILABLE,
                                             codec.one_line(f"{self.who}: {self.loop.error}"))
        finally:
            reader.cancel()
            self._abort_all()

    def _started(self) -> bool:
        return any(t is None for t in self.live.values())

    # ---- commands ------------------------------------------------------------------------------------------
    async def _read(self, commands: AsyncIterator[wpb.SessionCommands | Undecodable]) -> None:
        try:
            async for msg in commands:
                if isinstance(msg, Undecodable):  # logged by the parse guard; no request to refuse but this
                    self._refuse("", Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                             f"command could not be parsed: {msg.error}"))
                    continue
                for cmd in msg.commands:
                    self._command(cmd)
        except Exception as e:  # the router's stream broke
            log.info("%s: a session's stream broke: %s", self.who, codec.one_line(str(e)))
        finally:
            self._ended = True
            self._ready.set()

    def _command(self, cmd: wpb.SessionCommand) -> None:
        kind = cmd.WhichOneof("kind")
        if kind in ("decode", "generate"):
            request = cmd.decode if kind == "decode" else cmd.generate
            rid = request.request_id
            if rid in self.live:
                self._refuse(rid, Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"request {rid[:64]!r} is already live on this session"))
                return
            self.live[rid] = asyncio.ensure_future(self._start(rid, kind, request))
        elif kind == "first_token":
            task = asyncio.ensure_future(self._first_token(cmd.first_token))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "cancel":
            self._cancel(cmd.cancel)
        else:
            self._refuse("", Refusal(grpc.StatusCode.INVALID_ARGUMENT, "empty command: set one of decode, "
                                     "generate, first_token or cancel"))

    async def _start(self, rid: str, kind: str, request: wpb.DecodeRequest | wpb.LocalRequest) -> None:
        svc = self.service
        if kind == "decode":
            started = await start(self.who, self.loop, lambda: svc.check_decode(request), "reserve_remote_prefill",
                                  lambda o: self._on_output(rid, o), svc.no_room)
        else:
            started = await start(self.who, self.loop, lambda: svc.check(request), "add_request",
                                  lambda o: self._on_output(rid, o))
        if isinstance(started, Refusal):
            self.live.pop(rid, None)
            self._refuse(rid, started)
            return
        if self.live.get(rid) is not None:  # not finished (nor cancelled) while the start returned
            self.live[rid] = None
        if kind == "decode":
            r = started[1]
            self._send(wpb.SessionEvent(request_id=rid, reserved=wpb.Reserved(
                num_blocks=len(r.block_ids), free_blocks=r.free_blocks, num_cached_blocks=r.num_cached_blocks)))

    async def _first_token(self, request: wpb.FirstToken) -> None:
        refused = await self.service.first_token(request)
        if refused is not None:  # a reservation stays as it was: the router cancels it
            self._refuse(request.request_id, refused)

    def _cancel(self, rid: str) -> None:
        if rid not in self.live:
            return  # finished or refused already (or never here): nothing to free
        task = self.live.pop(rid)
        self._outputs.pop(rid, None)
        if task is not None and not task.done():
            task.cancel()  # the start aborts what it may have started
        else:
            self._abort(rid)

    def _abort(self, rid: str) -> None:
        self.loop.unsubscribe(rid)
        try:
            self.loop.call("abort_request", rid)
        except EngineDead:
            pass  # its blocks went with the engine

    def _abort_all(self) -> None:
        for rid in list(self.live):
            self._cancel(rid)

    # ---- events --------------------------------------------------------------------------------------------
    def _on_output(self, rid: str, out: RequestOutput) -> None:
        """The request's sink: runs on this loop, a step's outputs of all requests in one callback."""
        if rid not in self.live:
            return  # cancelled: the router no longer listens
        if out.finished:
            self.live.pop(rid)
        outs = self._outputs.get(rid)
        if outs is None:
            self._outputs[rid] = [out]
            self._entries.append(rid)
        else:
            outs.append(out)
        self._ready.set()

    def _refuse(self, rid: str, refusal: Refusal) -> None:
        self._send(wpb.SessionEvent(request_id=rid, refused=wpb.Refused(code=refusal.code.name,
                                                                        message=codec.one_line(refusal.message))))

    def _send(self, event: wpb.SessionEvent) -> None:
        self._entries.append(event)
        self._ready.set()

    def _take(self) -> wpb.SessionEvents:
        """Everything to send, as one message: each request's buffered outputs as one tokens event (and its
        finished event)."""
        msg = wpb.SessionEvents()
        for entry in self._entries:
            if not isinstance(entry, str):
                msg.events.append(entry)
                continue
            batch = self._outputs.pop(entry, None)
            if not batch:
                continue  # cancelled meanwhile
            if any(o.new_token_ids for o in batch):
                msg.events.append(wpb.SessionEvent(request_id=entry, tokens=tokens_message(batch)))
            out = batch[-1]
            if out.finished:
                msg.events.append(wpb.SessionEvent(request_id=entry, finished=wpb.DecodeFinished(
                    finish_reason=out.finish_reason or "abort", error=codec.one_line(out.error or ""),
                    cached_prompt_tokens=out.num_cached_tokens)))
        self._entries = []
        return msg


def tokens_message(batch: list[RequestOutput]) -> wpb.DecodeTokens:
    """The new tokens (and logprobs) of consecutive outputs of one request, as one message. The first token's
    logprob is the prefill worker's, so the logprobs may be one short: they cover the last tokens."""
    new = [t for o in batch for t in o.new_token_ids]
    msg = wpb.DecodeTokens(start_index=batch[-1].num_output_tokens - len(new), token_ids=new)
    msg.logprobs.extend(codec.logprob_message(lp.logprob, lp.top) for o in batch for lp in (o.new_logprobs or ()))
    return msg
