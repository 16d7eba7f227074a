"""The decode group's gRPC service (on rank 0): the one place where its protobuf meets the engine's objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from engine.engine_loop import EngineDead
from engine.kv_connector import RemoteReservation
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from protos import checks, codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from worker_runtime.drain import Drain
from worker_runtime.handle import EngineHandle
from worker_runtime.health import load_fields
from worker_runtime.rpc import Refusal, Started, follow, start_request

# Listen opens stores on free ports without waiting for the peer (the channels form on threads of their own), so
# it is quick; past this the caller gets DEADLINE_EXCEEDED rather than waiting on a stuck engine.
LISTEN_TIMEOUT_S = 30.0
# Prefill workers one group listens for: each holds stores and receiver threads, so a caller cannot pile them up.
MAX_PEERS = 64


class DecodeService(wpb_grpc.DecodeGroupServicer):
    def __init__(self, name: str, loop: EngineHandle, drain: Drain | None = None) -> None:
        self.name, self.loop = name, loop
        self.drain = drain or Drain()  # once draining, Decode and Generate are refused (UNAVAILABLE "... is draining")
        cfg = loop.config
        self.vocab_size, self.max_model_len = cfg.model.vocab_size, cfg.scheduler.max_model_len
        self.peers: dict[str, int] = {}  # prefill worker -> its ranks, once a Listen for it succeeded

    def _check(self, request: wpb.DecodeRequest | wpb.LocalRequest) -> tuple[str, tuple[list[int], SamplingParams]]:
        """(request id, (prompt, sampling parameters)) of a valid request; ValueError says what is wrong (a
        Refusal while draining)."""
        self.drain.check(f"decode group {self.name}")
        rid = checks.identifier(request.request_id, "request_id")
        prompt = checks.prompt(request.prompt_token_ids, self.vocab_size, self.max_model_len)
        params = SamplingParams(**checks.sampling(request.sampling, self.vocab_size),
                                output_offset=request.output_offset)  # a migrated request's noise continues
        return rid, (prompt, params)

    def _check_decode(self, request: wpb.DecodeRequest) -> tuple[str, tuple[list[int], SamplingParams, str, int,
                                                                             float]]:
        """`_check`, the transfer deadline, and the pair's wiring (FAILED_PRECONDITION: not the caller's input
        alone, the pair may need (re-)wiring, so a router tries elsewhere)."""
        rid, (prompt, params) = self._check(request)
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

    async def Decode(self, request: wpb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[wpb.DecodeEvent]:
        def no_room(reservation: RemoteReservation | None) -> Refusal | None:
            if reservation is not None:
                return None
            return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode group {self.name} has no free KV blocks "
                           f"or seats now ({self.loop.stats.free_blocks} blocks free)")

        started = await start_request(context, f"decode group {self.name}", self.loop,
                                      lambda: self._check_decode(request), "reserve_remote_prefill", no_room)
        reservation = started.value
        started.value = wpb.Reserved(num_blocks=len(reservation.block_ids), free_blocks=reservation.free_blocks,
                                     num_cached_blocks=reservation.num_cached_blocks)
        yield wpb.DecodeEvent(reserved=started.value)
        async for ev in self._relay(started):
            yield ev

    async def Generate(self, request: wpb.LocalRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[wpb.DecodeEvent]:
        started = await start_request(context, f"decode group {self.name}", self.loop, lambda: self._check(request),
                                      "add_request")
        async for ev in self._relay(started):
            yield ev

    async def _relay(self, started: Started) -> AsyncIterator[wpb.DecodeEvent]:
        """A request's outputs as events until it finishes: the outputs that arrived while the last message was
        being sent go out as one (`follow` aborts the request if the call ends first)."""
        async for batch in follow(self.loop, started):
            out = batch[-1]
            if any(o.new_token_ids for o in batch):
                yield wpb.DecodeEvent(tokens=tokens_message(batch))
            if out.finished:
                yield wpb.DecodeEvent(finished=wpb.DecodeFinished(
                    finish_reason=out.finish_reason or "abort", error=codec.one_line(out.error or ""),
                    cached_prompt_tokens=out.num_cached_tokens))

    async def SetFirstToken(self, request: wpb.FirstToken, context: grpc.aio.ServicerContext) -> wpb.Ack:
        try:
            rid = checks.identifier(request.request_id, "request_id")
            await self.loop.acall("set_first_token", rid, request.token_id)
        except ValueError as e:  # an empty id, or a token outside the vocabulary (the engine's check)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"decode group {self.name} has no reservation for request {rid!r}")
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {codec.one_line(e)}")
        return wpb.Ack()

    async def GetLoad(self, request: wpb.LoadRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerLoad:
        return codec.load_message(load_fields(self.name, self.loop, self.drain.draining))


def tokens_message(batch: list[RequestOutput]) -> wpb.DecodeTokens:
    """The new tokens (and logprobs) of consecutive outputs of one request, as one message. The first token's
    logprob is the prefill worker's, so the logprobs may be one short: they cover the last tokens."""
    new = [t for o in batch for t in o.new_token_ids]
    msg = wpb.DecodeTokens(start_index=batch[-1].num_output_tokens - len(new), token_ids=new)
    msg.logprobs.extend(codec.logprob_message(lp.logprob, lp.top) for o in batch for lp in (o.new_logprobs or ()))
    return msg


def add_to_server(server: Any, service: DecodeService) -> None:
    wpb_grpc.add_DecodeGroupServicer_to_server(service, server)
