"""The router's side of the internal control API: the one place where the router meets the worker protobufs.
Calls return dataclasses and fail with `WorkerError` (the gRPC status name and the worker's message)."""

from __future__ import annotations

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

    def __init__(self, address: str, secret: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.md = secret_metadata(secret)

    async def close(self) -> None:
        await self.channel.close()


class PrefillClient(_Client):
    def __init__(self, address: str, secret: str) -> None:
        super().__init__(address, secret)
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


class DecodeStream:
    """One request's Decode call: `async for event in stream` (Reserved, then Tokens..., then Finished)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def __aiter__(self) -> AsyncIterator[Reserved | Tokens | Finished]:
        try:
            async for ev in self._call:
                kind = ev.WhichOneof("kind")
                if kind == "reserved":
                    yield Reserved(ev.reserved.num_blocks, ev.reserved.free_blocks, ev.reserved.num_cached_blocks)
                elif kind == "tokens":
                    t = ev.tokens
                    yield Tokens(t.start_index, list(t.token_ids), [codec.logprob_fields(x) for x in t.logprobs])
                else:
                    f = ev.finished
                    yield Finished(f.finish_reason, codec.one_line(f.error), f.cached_prompt_tokens)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    def cancel(self) -> None:
        """Abort the request on the decode group (its blocks are freed)."""
        self._call.cancel()


class DecodeClient(_Client):
    def __init__(self, address: str, secret: str) -> None:
        super().__init__(address, secret)
        self.stub = wpb_grpc.DecodeGroupStub(self.channel)

    async def listen(self, prefill_worker: str, prefill_tp: int) -> list[ChannelAddress]:
        try:
            r = await self.stub.Listen(wpb.ListenRequest(prefill_worker=prefill_worker,
                                                         prefill_tensor_parallel_size=prefill_tp), metadata=self.md)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return [ChannelAddress(c.decode_rank, c.prefill_rank, c.host, c.port) for c in r.channels]

    def decode(self, request_id: str, prompt: list[int], params: Any, prefill_worker: str, prefill_tp: int,
               transfer_timeout_s: float) -> DecodeStream:
        req = wpb.DecodeRequest(request_id=request_id, prompt_token_ids=prompt,
                                sampling=codec.sampling_message(params, drop_stop=True),
                                prefill_worker=prefill_worker, prefill_tensor_parallel_size=prefill_tp,
                                transfer_timeout_s=transfer_timeout_s, output_offset=params.output_offset)
        return DecodeStream(self.stub.Decode(req, metadata=self.md))

    def generate(self, request_id: str, prompt: list[int], params: Any) -> DecodeStream:
        """The whole request on this group, prefill included (a deployment without prefill workers)."""
        return DecodeStream(self.stub.Generate(wpb.LocalRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=codec.sampling_message(params, drop_stop=True),
            output_offset=params.output_offset), metadata=self.md))

    async def set_first_token(self, request_id: str, token: int) -> None:
        try:
            await self.stub.SetFirstToken(wpb.FirstToken(request_id=request_id, token_id=token), metadata=self.md)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def load(self, timeout_s: float) -> Load:
        try:
            return _load(await self.stub.GetLoad(wpb.LoadRequest(), timeout=timeout_s, metadata=self.md))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
