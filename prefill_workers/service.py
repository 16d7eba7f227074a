"""The prefill worker's gRPC service: the one place where its protobuf meets the engine's Python objects."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import grpc

from engine.config import KVLayout
from engine.engine_loop import EngineDead
from engine.sampling_params import SamplingParams
from protos import checks, codec
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from worker_runtime.drain import Drain
from worker_runtime.handle import EngineHandle
from worker_runtime.health import load_fields
from worker_runtime.rpc import Refusal, follow, refuse, start_request

# A Connect waits this long at most (less when its caller's deadline is sooner) for the pair's channels to form.
CONNECT_TIMEOUT_S = 60.0
# Connects under way at once: each holds a thread until its peer answers or it times out.
MAX_CONNECTS = 16
CONNECT_POLL_S = 0.02


class PrefillService(wpb_grpc.PrefillWorkerServicer):
    def __init__(self, name: str, loop: EngineHandle, drain: Drain | None = None) -> None:
        self.name, self.loop = name, loop
        self.drain = drain or Drain()  # once draining, new prompts are refused (UNAVAILABLE "... is draining")
        cfg = loop.config
        self.vocab_size, self.max_model_len = cfg.model.vocab_size, cfg.scheduler.max_model_len
        self.tp = cfg.parallel.tensor_parallel_size
        self.connected: dict[str, int] = {}  # decode group -> its ranks, once a Connect to it succeeded
        self._tickets = itertools.count()
        self._connecting = 0

    def _parse(self, request: wpb.PrefillRequest) -> tuple[str, tuple[list[int], SamplingParams, dict | None]]:
        """(request id, (prompt, parameters, transfer)) of a valid request; ValueError or Refusal otherwise."""
        self.drain.check(f"prefill worker {self.name}")
        rid = checks.identifier(request.request_id, "request_id")
        prompt = checks.prompt(request.prompt_token_ids, self.vocab_size, self.max_model_len)
        params = SamplingParams(**checks.sampling(request.sampling, self.vocab_size),
                                output_offset=request.output_offset)
        if request.decode_group and request.decode_group not in self.connected:
            # Not the caller's input alone: the pair may need (re-)wiring, so a router retries elsewhere.
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"prefill worker {self.name} has no KV channels to "
                          f"decode group {request.decode_group[:64]!r}: Connect first")
        block_size = self.loop.config.cache.block_size
        if request.skip_blocks and request.skip_blocks * block_size >= len(prompt):
            raise ValueError(f"skip_blocks {request.skip_blocks} leaves nothing of a {len(prompt)}-token prompt "
                             f"to send (blocks of {block_size} tokens)")
        transfer = ({"peer": request.decode_group, "skip_blocks": request.skip_blocks} if request.decode_group
                    else None)
        return rid, (prompt, params, transfer)

    async def Prefill(self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext) -> wpb.PrefillResult:
        who = f"prefill worker {self.name}"
        started = await start_request(context, who, self.loop, lambda: self._parse(request), "add_request")
        async for batch in follow(self.loop, started):
            out = batch[-1]
        if out.finish_reason == "abort" or not out.token_ids:
            await refuse(context, grpc.StatusCode.UNAVAILABLE, f"{who}: {out.error or 'request aborted'}")
        result = wpb.PrefillResult(first_token_id=out.token_ids[0], cached_prompt_tokens=out.num_cached_tokens,
                                   finish_reason=out.finish_reason or "")
        if out.logprobs:
            lp = out.logprobs[0]
            result.first_logprob.CopyFrom(codec.logprob_message(lp.logprob, lp.top))
        return result

    async def Connect(self, request: wpb.ConnectRequest, context: grpc.aio.ServicerContext) -> wpb.ConnectReply:
        """Joins the pair's channels off the engine loop: the engine only starts the connect and, between steps,
        polls it (each a quick call), so a peer that never answers delays no prefill; a failed or timed-out
        Connect fails only itself and leaves the pair's current channels as they were."""
        try:
            group = checks.identifier(request.decode_group, "decode_group")
            tp = checks.tensor_parallel_size(request.decode_tensor_parallel_size, "decode_tensor_parallel_size")
            addresses = checks.channel_addresses(request.channels, tp, self.tp)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.HasField("decode_layout"):
            theirs = KVLayout(**codec.layout_fields(request.decode_layout))
            why = KVLayout.of(self.loop.config).mismatch(theirs, f"prefill worker {self.name}",
                                                                f"decode group {group}")
            if why is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        if self._connecting >= MAX_CONNECTS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill worker {self.name} has "
                                f"{MAX_CONNECTS} Connects under way already: retry once they are done")
        remaining = context.time_remaining()
        timeout_s = min(CONNECT_TIMEOUT_S, remaining) if remaining is not None else CONNECT_TIMEOUT_S
        ticket = f"connect-{next(self._tickets)}"
        self._connecting += 1
        try:
            error = await self._connect(ticket, group, tp, addresses, timeout_s)
        finally:
            self._connecting -= 1
        if error is not None:
            code, message = error
            await context.abort(code, f"prefill worker {self.name} could not connect to {group!r}: {message}")
        self.connected[group] = tp
        return wpb.ConnectReply()

    async def _connect(self, ticket: str, group: str, tp: int, addresses: list[dict[int, tuple[str, int]]],
                       timeout_s: float) -> tuple[grpc.StatusCode, str] | None:
        """None once every rank installed the new channels; else (status, why)."""
        try:
            await self.loop.acall("call_extension", "start_connect", group, tp, addresses, ticket, timeout_s)
        except ValueError as e:
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:  # EngineDead, or a rank refused it
            return grpc.StatusCode.UNAVAILABLE, codec.one_line(e)
        deadline = time.monotonic() + timeout_s + 1.0  # the connect thread's own timeout ends it first
        try:
            while time.monotonic() < deadline:
                states = await self.loop.acall("call_extension", "connect_state", ticket)
                errors = [s for s in states if s]
                if errors:
                    return grpc.StatusCode.UNAVAILABLE, codec.one_line(errors[0])
                if all(s == "" for s in states):
                    return None
                await asyncio.sleep(CONNECT_POLL_S)
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"its KV channels did not form within {timeout_s:.1f} s"
        except EngineDead as e:
            return grpc.StatusCode.UNAVAILABLE, codec.one_line(e)
        finally:  # done, failed, timed out or the caller went away: a connect not installed is abandoned
            self.loop.call("call_extension", "connect_state", ticket, True)

    async def GetLoad(self, request: wpb.LoadRequest, context: grpc.aio.ServicerContext) -> wpb.WorkerLoad:
        return codec.load_message(load_fields(self.name, self.loop, self.drain.draining))


def add_to_server(server: Any, service: PrefillService) -> None:
    wpb_grpc.add_PrefillWorkerServicer_to_server(service, server)
