"""The prefill worker's gRPC service: the one place where its protobuf meets the engine's Python objects."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from engine.engine_loop import EngineDead, EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from protos import codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc


class PrefillService(wpb_grpc.PrefillWorkerServicer):
    def __init__(self, name: str, loop: EngineLoop) -> None:
        self.name, self.loop = name, loop

    async def Prefill(self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext) -> wpb.PrefillResult:
        rid = request.request_id
        try:
            params = SamplingParams(**codec.sampling_kwargs(request.sampling))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        transfer = {"peer": request.decode_group} if request.decode_group else None
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def add(eng: LLMEngine) -> None:
            eng.add_request(rid, list(request.prompt_token_ids), params, transfer=transfer)
            self.loop.subscribe(rid, outputs.put_nowait)  # runs on this server's loop (deliver_on)

        try:
            await self.loop.astart(rid, add)
        except EngineDead as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill worker {self.name}: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            out = await outputs.get()
            while not out.finished:
                out = await outputs.get()
        except asyncio.CancelledError:  # the router cancelled (client gone, deadline): free the blocks now
            self.loop.call(lambda eng: eng.abort_request(rid))
            raise
        if out.finish_reason == "abort" or not out.token_ids:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"prefill worker {self.name}: {out.error or 'request aborted'}")
        result = wpb.PrefillResult(first_token_id=out.token_ids[0], cached_prompt_tokens=out.num_cached_tokens,
                                   finish_reason=out.finish_reason or "")
        if out.logprobs:
            lp = out.logprobs[0]
            result.first_logprob.CopyFrom(codec.logprob_message(lp.logprob, lp.top))
        return result

    async def Connect(self, request: wpb.ConnectRequest, context: grpc.aio.ServicerContext) -> wpb.ConnectReply:
        tp = request.decode_tensor_parallel_size
        addresses: list[dict[int, tuple[str, int]]] = [{} for _ in range(tp)]
        for c in request.channels:
            if c.decode_rank >= tp:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"channel for decode rank {c.decode_rank} of a group of {tp} ranks")
            addresses[c.decode_rank][c.prefill_rank] = (c.host, c.port)
        try:
            await self.loop.acall(lambda eng: eng.call_extension("connect", request.decode_group, tp, addresses))
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"prefill worker {self.name} could not connect to {request.decode_group!r}: {e}")
        return wpb.ConnectReply()

    async def GetLoad(self, request: wpb.LoadRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerLoad:
        return codec.load_message(self.name, self.loop)


def add_to_server(server: Any, service: PrefillService) -> None:
    wpb_grpc.add_PrefillWorkerServicer_to_server(service, server)
