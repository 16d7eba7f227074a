"""The router's side of the internal control API: the one place where the router meets the worker protobufs.
Calls return dataclasses and fail with `WorkerError` (the gRPC status name and the worker's message). A decode
group's requests share one stream (`_Session`); a prefill is one call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from protos import codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from protos.codec import DRAINING
from protos.guards import secret_metadata

# Keepalive pings: a worker whose node vanished without closing its connections (power loss, partition) fails
# its open calls within ~30 s instead of the OS's TCP timeout. Worker servers allow these pings
# (protos.guards.SERVER_OPTIONS).
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
           ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 20_000),
           ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


class WorkerError(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> WorkerError:
        """The status and a one-line cause: what a worker says may reach clients, a traceback must not."""
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code.name if code is not None else "UNKNOWN", codec.one_line(details or "no details"))

    @property
    def draining(self) -> bool:
        """A refusal from a worker that is scaling down (worker_runtime.drain): not a failure, try another."""
        return self.code == "UNAVAILABLE" and self.details.endswith(DRAINING)


@dataclass
class PrefillOutcome:
    first_token: int
    logprob: tuple[float, list[tuple[int, float]]] | None
    cached_tokens: int
    finish_reason: str


@dataclass
class Reserved:
    num_blocks: int
    free_blocks: int
    num_cached_blocks: int = 0  # leading prompt blocks the group's prefix cache holds: not sent


@dataclass
class Tokens:
    start_index: int
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]]


@dataclass
class Finished:
    finish_reason: str
    error: str
    cached_prompt_tokens: int = 0  # requests the group prefilled itself (Generate)


@dataclass
class Load:
    name: str
    num_blocks: int
    free_blocks: int
    block_size: int
    running: int
    waiting: int
    prefix_cache_hit_rate: float
    healthy: bool
    error: str
    max_num_seqs: int
    num_preemptions: int = 0  # since the worker started
    kv_layout: dict[str, Any] | None = None  # engine.config.KVLayout's fields; None from a worker that sends none
    draining: bool = False  # scaling down: it takes no new work and exits once idle


@dataclass(frozen=True)
class ChannelAddress:
    decode_rank: int
    prefill_rank: int
    host: str
    port: int


def _load(msg: wpb.WorkerLoad) -> Load:
    return Load(msg.name, msg.num_blocks, msg.free_blocks, msg.block_size, msg.running, msg.waiting,
                msg.prefix_cache_hit_rate, msg.healthy, codec.one_line(msg.error), msg.max_num_seqs,
                msg.num_preemptions, codec.layout_fields(msg.kv_layout) if msg.HasField("kv_layout") else None,
                msg.draining)


class _Client:
    """Every call carries the deployment's secret (protos.guards), which the workers require."""

    def __init__(self, address: str, secret: str, name: str = "") -> None:
        self.address, self.name = address, name or address
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.md = secret_metadata(secret)

    async def close(self) -> None:
        await self.channel.close()


class PrefillClient(_Client):
    def __init__(self, address: str, secret: str, name: str = "") -> None:
        super().__init__(address, secret, name)
        self.stub = wpb_grpc.PrefillWorkerStub(self.channel)

    async def prefill(self, request_id: str, prompt: list[int], params: Any, decode_group: str,
                      skip_blocks: int = 0) -> PrefillOutcome:
        """Cancelling the awaiting task cancels the call, which aborts the request on the worker. `skip_blocks`:
        leading prompt blocks the decode group holds already (not sent)."""
        req = wpb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                 sampling=codec.sampling_message(params, drop_stop=True), decode_group=decode_group,
                                 skip_blocks=skip_blocks, output_offset=params.output_offset)
        try:
            r = await self.stub.Prefill(req, metadata=self.md)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        lp = codec.logprob_fields(r.first_logprob) if r.HasField("first_logprob") else None
        return PrefillOutcome(r.first_token_id, lp, r.cached_prompt_tokens, r.finish_reason)

    async def connect(self, decode_group: str, decode_tp: int, channels: list[ChannelAddress],
                      decode_layout: dict[str, Any] | None = None) -> None:
        req = wpb.ConnectRequest(decode_group=decode_group, decode_tensor_parallel_size=decode_tp, channels=[
            wpb.ChannelAddress(decode_rank=c.decode_rank, prefill_rank=c.prefill_rank, host=c.host, port=c.port)
            for c in channels])
        if decode_layout is not None:
            req.decode_layout.CopyFrom(codec.layout_message(decode_layout))
        try:
            await self.stub.Connect(req, metadata=self.md)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def load(self, timeout_s: float) -> Load:
        try:
            return _load(await self.stub.GetLoad(wpb.LoadRequest(), timeout=timeout_s, metadata=self.md))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None


Event = Reserved | Tokens | Finished


class _Session:
    """The router's one stream to a decode group (`DecodeGroup.Session`), shared by all its requests there.
    Requests queue their commands; a writer task sends what queued meanwhile as one message, so many requests'
    commands cost one write. A reader task hands each event to its request's queue. Once the stream breaks, every
    open request gets the break (UNAVAILABLE) and the client opens a new session for the next request.
    Mutates: its requests' queues."""

    def __init__(self, stub: wpb_grpc.DecodeGroupStub, md: Any, group: str) -> None:
        self.group = group
        self.queues: dict[str, asyncio.Queue[Any]] = {}  # request id -> its events; None: the session broke
        self.broken: WorkerError | None = None
        self._commands: asyncio.Queue[wpb.SessionCommand] = asyncio.Queue()
        self._call = stub.Session(self._outgoing(), metadata=md)
        self._reader = asyncio.ensure_future(self._read())

    def open(self, request_id: str, command: wpb.SessionCommand) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[request_id] = q
        if self.broken is not None:
            q.put_nowait(None)
        else:
            self.send(command)
        return q

    def send(self, command: wpb.SessionCommand) -> None:
        self._commands.put_nowait(command)

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def _outgoing(self) -> AsyncIterator[wpb.SessionCommands]:
        while True:
            msg = wpb.SessionCommands(commands=[await self._commands.get()])
            while not self._commands.empty():  # what queued while the last message was written goes as one
                msg.commands.append(self._commands.get_nowait())
            yield msg

    async def _read(self) -> None:
        try:
            async for msg in self._call:
                for ev in msg.events:
                    q = self.queues.get(ev.request_id)
                    if q is not None:  # else a request that was cancelled or finished: no one listens
                        q.put_nowait(ev)
            error = WorkerError("UNAVAILABLE", f"decode group {self.group} ended the session")
        except grpc.RpcError as e:
            error = WorkerError("UNAVAILABLE", WorkerError.from_rpc(e).details)
        except asyncio.CancelledError:
            error = WorkerError("UNAVAILABLE", f"the session with decode group {self.group} was closed")
        self.broken = error
        for q in self.queues.values():
            q.put_nowait(None)

    def shut(self) -> None:
        self._call.cancel()
        self._reader.cancel()


class DecodeStream:
    """One request on a decode group's session: `async for event in stream` (Reserved, then Tokens..., then
    Finished). A refused command raises WorkerError(its status name, the group's message); a broken session
    WorkerError("UNAVAILABLE", ...)."""

    def __init__(self, session: _Session, request_id: str, command: wpb.SessionCommand) -> None:
        self._session, self.request_id = session, request_id
        self._events = session.open(request_id, command)
        self._done = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._done:
            ev = await self._events.get()
            if ev is None:
                self._close()
                assert self._session.broken is not None
                raise self._session.broken
            kind = ev.WhichOneof("kind")
            if kind == "reserved":
                yield Reserved(ev.reserved.num_blocks, ev.reserved.free_blocks, ev.reserved.num_cached_blocks)
            elif kind == "tokens":
                t = ev.tokens
                yield Tokens(t.start_index, list(t.token_ids), [codec.logprob_fields(x) for x in t.logprobs])
            elif kind == "finished":
                self._close()
                f = ev.finished
                yield Finished(f.finish_reason, codec.one_line(f.error), f.cached_prompt_tokens)
            else:
                self._close()
                raise WorkerError(ev.refused.code or "UNKNOWN", codec.one_line(ev.refused.message or "refused"))

    def _close(self) -> None:
        self._done = True
        self._session.close(self.request_id)

    def set_first_token(self, token: int) -> None:
        """Queue the reserved request's first token on its session: nothing to wait for. If the group cannot
        take it (the reservation is gone, the token is bad), this stream raises the refusal."""
        if not self._done and self._session.broken is None:
            self._session.send(wpb.SessionCommand(first_token=wpb.FirstToken(request_id=self.request_id,
                                                                             token_id=token)))

    def cancel(self) -> None:
        """Abort the request on the decode group (its blocks are freed); a no-op once it ended."""
        if not self._done:
            self._close()
            if self._session.broken is None:
                self._session.send(wpb.SessionCommand(cancel=self.request_id))


class DecodeClient(_Client):
    """Every request on the group goes over one session, opened on the first and again after one broke."""

    def __init__(self, address: str, secret: str, name: str = "") -> None:
        super().__init__(address, secret, name)
        self.stub = wpb_grpc.DecodeGroupStub(self.channel)
        self._session: _Session | None = None

    def session(self) -> _Session:
        if self._session is None or self._session.broken is not None:
            self._session = _Session(self.stub, self.md, self.name)
        return self._session

    async def listen(self, prefill_worker: str, prefill_tp: int) -> list[ChannelAddress]:
        try:
            r = await self.stub.Listen(wpb.ListenRequest(prefill_worker=prefill_worker,
                                                         prefill_tensor_parallel_size=prefill_tp), metadata=self.md)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return [ChannelAddress(c.decode_rank, c.prefill_rank, c.host, c.port) for c in r.channels]

    def decode(self, request_id: str, prompt: list[int], params: Any, prefill_worker: str, prefill_tp: int,
               transfer_timeout_s: float) -> DecodeStream:
        """Reserve blocks for a prompt `prefill_worker` will send; the stream's first event is Reserved."""
        req = wpb.DecodeRequest(request_id=request_id, prompt_token_ids=prompt,
                                sampling=codec.sampling_message(params, drop_stop=True),
                                prefill_worker=prefill_worker, prefill_tensor_parallel_size=prefill_tp,
                                transfer_timeout_s=transfer_timeout_s, output_offset=params.output_offset)
        return DecodeStream(self.session(), request_id, wpb.SessionCommand(decode=req))

    def generate(self, request_id: str, prompt: list[int], params: Any) -> DecodeStream:
        """The whole request on this group, prefill included (a deployment without prefill workers)."""
        req = wpb.LocalRequest(request_id=request_id, prompt_token_ids=prompt,
                               sampling=codec.sampling_message(params, drop_stop=True),
                               output_offset=params.output_offset)
        return DecodeStream(self.session(), request_id, wpb.SessionCommand(generate=req))

    async def load(self, timeout_s: float) -> Load:
        try:
            return _load(await self.stub.GetLoad(wpb.LoadRequest(), timeout=timeout_s, metadata=self.md))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def close(self) -> None:
        if self._session is not None:
            self._session.shut()
        await super().close()
