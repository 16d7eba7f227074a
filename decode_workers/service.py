"""The decode group's gRPC service (on rank 0): the one place where its protobuf meets the engine's objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from decode_workers.session import Session
from engine.engine_loop import EngineDead
from engine.kv_connector import RemoteReservation
from engine.sampling_params import SamplingParams
from protos import checks, codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from worker_runtime.drain import Drain
from worker_runtime.handle import EngineHandle
from worker_runtime.health import load_fields
from worker_runtime.rpc import Refusal

# Listen opens stores on free ports without waiting for the peer (the channels form on threads of their own), so
# it is quick; past this the caller gets DEADLINE_EXCEEDED rather than waiting on a stuck engine.
LISTEN_TIMEOUT_S = 30.0
# Prefill workers one group listens for: each holds stores and receiver threads, so a caller cannot pile them up.
MAX_PEERS = 64


class DecodeService(wpb_grpc.DecodeGroupServicer):
    def __init__(self, name: str, loop: EngineHandle, drain: Drain | None = None) -> None:
        self.name, self.loop = name, loop
        self.drain = drain or Drain()  # once draining, new requests are refused (UNAVAILABLE "... is draining")
        cfg = loop.config
        self.vocab_size, self.max_model_len = cfg.model.vocab_size, cfg.scheduler.max_model_len
        self.peers: dict[str, int] = {}  # prefill worker -> its ranks, once a Listen for it succeeded

    def check(self, request: wpb.DecodeRequest | wpb.LocalRequest) -> tuple[str, tuple[list[int], SamplingParams]]:
        """(request id, (prompt, sampling parameters)) of a valid request; ValueError says what is wrong (a
        Refusal while draining)."""
        self.drain.check(f"decode group {self.name}")
        rid = checks.identifier(request.request_id, "request_id")
        prompt = checks.prompt(request.prompt_token_ids, self.vocab_size, self.max_model_len)
        params = SamplingParams(**checks.sampling(request.sampling, self.vocab_size),
                                output_offset=request.output_offset)  # a migrated request's noise continues
        return rid, (prompt, params)

    def check_decode(self, request: wpb.DecodeRequest) -> tuple[str, tuple[list[int], SamplingParams, str, int,
                                                                             float]]:
        """`check`, the transfer deadline, and the pair's wiring (FAILED_PRECONDITION: not the caller's input
        alone, the pair may need (re-)wiring, so a router tries elsewhere)."""
        rid, (prompt, params) = self.check(request)
        timeout_s = checks.transfer_timeout(request.transfer_timeout_s)
        peer, peer_tp = request.prefill_worker, request.prefill_tensor_parallel_size
        if self.peers.get(peer) != peer_tp:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"decode group {self.name} has no KV channels from "
                          f"prefill worker {peer[:64]!r} of {peer_tp} rank(s): Listen first")
        return rid, (prompt, params, peer, peer_tp, timeout_s)

    async def Listen(self, request: wpb.ListenRequest, context: grpc.aio.ServicerContext) -> wpb.ListenReply:
        try:
            peer = checks.identifier(request.prefill_worker, "prefill_worker")
            tp = checks.tensor_parallel_size(request.prefill_tensor_parallel_size, "prefill_tensor_parallel_size")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if peer not in self.peers and len(self.peers) >= MAX_PEERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"decode group {self.name} listens for {MAX_PEERS} prefill workers already")
        try:
            per_rank = await asyncio.wait_for(self.loop.acall("call_extension", "listen", peer, tp),
                                              LISTEN_TIMEOUT_S)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"decode group {self.name} did not open its KV channels within {LISTEN_TIMEOUT_S} s")
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"decode group {self.name} could not listen: {codec.one_line(e)}")
        self.peers[peer] = tp
        return wpb.ListenReply(channels=[
            wpb.ChannelAddress(decode_rank=d, prefill_rank=p, host=host, port=port)
            for d, addrs in enumerate(per_rank) for p, (host, port) in sorted(addrs.items())])

    def no_room(self, reservation: RemoteReservation | None) -> Refusal | None:
        """RESOURCE_EXHAUSTED for a reservation the engine could not make (try later or another group)."""
        if reservation is not None:
            return None
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode group {self.name} has no free KV blocks "
                       f"or seats now ({self.loop.stats.free_blocks} blocks free)")

    async def first_token(self, request: wpb.FirstToken) -> Refusal | None:
        """Hand a reserved request its first token; the Refusal if that cannot be done (the reservation then
        stays as it was)."""
        try:
            rid = checks.identifier(request.request_id, "request_id")
            await self.loop.acall("set_first_token", rid, request.token_id)
        except ValueError as e:  # an empty id, or a token outside the vocabulary (the engine's check)
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError:
            return Refusal(grpc.StatusCode.NOT_FOUND,
                           f"decode group {self.name} has no reservation for request {rid[:64]!r}")
        except EngineDead as e:
            return Refusal(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {codec.one_line(str(e))}")
        return None

    async def Session(self, request_iterator: AsyncIterator[wpb.SessionCommands],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[wpb.SessionEvents]:
        async for events in Session(self, context).run(request_iterator):
            yield events

    async def GetLoad(self, request: wpb.LoadRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerLoad:
        return codec.load_message(load_fields(self.name, self.loop, self.drain.draining))


def add_to_server(server: Any, service: DecodeService) -> None:
    wpb_grpc.add_DecodeGroupServicer_to_server(service, server)
