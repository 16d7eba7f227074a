"""The decode group's gRPC service (on rank 0): the one place where its protobuf meets the engine's objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from engine.engine_loop import EngineDead, EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from protos import codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc


class DecodeService(wpb_grpc.DecodeGroupServicer):
    def __init__(self, name: str, loop: EngineLoop) -> None:
        self.name, self.loop = name, loop

    async def Listen(self, request: wpb.ListenRequest, context: grpc.aio.ServicerContext) -> wpb.ListenReply:
        peer, tp = request.prefill_worker, request.prefill_tensor_parallel_size
        try:
            per_rank = await self.loop.acall(lambda eng: eng.call_extension("listen", peer, tp))
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name} could not listen: {e}")
        return wpb.ListenReply(channels=[
            wpb.ChannelAddress(decode_rank=d, prefill_rank=p, host=host, port=port)
            for d, addrs in enumerate(per_rank) for p, (host, port) in sorted(addrs.items())])

    async def Decode(self, request: wpb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[wpb.DecodeEvent]:
        rid = request.request_id
        try:
            params = SamplingParams(**codec.sampling_kwargs(request.sampling))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def reserve(eng: LLMEngine) -> tuple[list[int] | None, int]:
            blocks = eng.reserve_remote_prefill(rid, list(request.prompt_token_ids), params, request.prefill_worker,
                                                request.prefill_tensor_parallel_size,
                                                timeout_s=request.transfer_timeout_s or 30.0)
            if blocks is not None:
                self.loop.subscribe(rid, outputs.put_nowait)  # runs on this server's loop (deliver_on)
            return blocks, eng.num_free_blocks

        try:
            blocks, free = await self.loop.astart(rid, reserve)
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # e.g. a rank could not register the transfer
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {e}")
        if blocks is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"decode group {self.name} has no free KV blocks or seats now ({free} blocks free)")
        reserved = wpb.DecodeEvent(reserved=wpb.Reserved(num_blocks=len(blocks), free_blocks=free))
        async for ev in self._relay(rid, outputs, first=reserved):
            yield ev

    async def Generate(self, request: wpb.LocalRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[wpb.DecodeEvent]:
        rid = request.request_id
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def add(eng: LLMEngine) -> None:
            eng.add_request(rid, list(request.prompt_token_ids), params)
            self.loop.subscribe(rid, outputs.put_nowait)  # runs on this server's loop (deliver_on)

        try:
            params = SamplingParams(**codec.sampling_kwargs(request.sampling))
            await self.loop.astart(rid, add)
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        async for ev in self._relay(rid, outputs):
            yield ev

    async def _relay(self, rid: str, outputs: asyncio.Queue[RequestOutput],
                     first: wpb.DecodeEvent | None = None) -> AsyncIterator[wpb.DecodeEvent]:
        """`first`, then a request's outputs as events until it finishes; if the call ends first (the router
        cancelled: client gone, stop string, deadline), abort the request so its blocks are freed now."""
        finished = False
        try:
            if first is not None:
                yield first
            while not finished:
                # Everything that arrived while the last message was being sent goes out as one message: under
                # load, fewer and larger messages; when idle, each token as soon as it exists.
                batch = [await outputs.get()]
                while not batch[-1].finished and not outputs.empty():
                    batch.append(outputs.get_nowait())
                out = batch[-1]
                finished = out.finished
                if any(o.new_token_ids for o in batch):
                    yield wpb.DecodeEvent(tokens=tokens_message(batch))
                if finished:
                    yield wpb.DecodeEvent(finished=wpb.DecodeFinished(
                        finish_reason=out.finish_reason or "abort", error=out.error or "",
                        cached_prompt_tokens=out.num_cached_tokens))
        finally:
            if not finished:
                self.loop.call(lambda eng: eng.abort_request(rid))

    async def SetFirstToken(self, request: wpb.FirstToken, context: grpc.aio.ServicerContext) -> wpb.Ack:
        try:
            await self.loop.acall(lambda eng: eng.set_first_token(request.request_id, request.token_id))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"decode group {self.name} has no reservation for request {request.request_id!r}")
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode group {self.name}: {e}")
        return wpb.Ack()

    async def GetLoad(self, request: wpb.LoadRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerLoad:
        return codec.load_message(self.name, self.loop)


def tokens_message(batch: list[RequestOutput]) -> wpb.DecodeTokens:
    """The new tokens (and logprobs) of consecutive outputs of one request, as one message. The first token's
    logprob is the prefill worker's, so the logprobs may be one short: they cover the last tokens."""
    new = [t for o in batch for t in o.new_token_ids]
    msg = wpb.DecodeTokens(start_index=batch[-1].num_output_tokens - len(new), token_ids=new)
    msg.logprobs.extend(codec.logprob_message(lp.logprob, lp.top) for o in batch for lp in (o.new_logprobs or ()))
    return msg


def add_to_server(server: Any, service: DecodeService) -> None:
    wpb_grpc.add_DecodeGroupServicer_to_server(service, server)
