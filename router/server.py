"""The router's gRPC server: the public Generation service, plus the standard grpc.health.v1 health service and
server reflection. Maps request failures to status codes with messages that say what to fix."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from protos.serving import SERVER_OPTIONS
from router import public_api
from router.config import RouterConfig
from router.errors import RequestError
from router.orchestrator import Orchestrator
from router.requests import ModelLimits, validate
from router.workers import WorkerPool, WorkerSpec

log = logging.getLogger("kvrelay.router")


class GenerationService(public_api.GenerationServicer):
    def __init__(self, orchestrator: Orchestrator, limits: ModelLimits, info: Any) -> None:
        self.orch, self.limits, self.info = orchestrator, limits, info
        self.live: set[str] = set()

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        prompt, sampling, rid = public_api.parse(request)
        try:
            spec = validate(prompt, sampling, rid or f"req-{uuid.uuid4().hex[:16]}", self.limits,
                            self.orch.tokenizer)
        except ValueError as e:
            self.orch.metrics.failed("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if spec.request_id in self.live:
            self.orch.metrics.failed("ALREADY_EXISTS")
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {spec.request_id!r} is already in use by a live request: pick another "
                                "or leave it empty")
        self.live.add(spec.request_id)
        try:
            async for item in self.orch.generate(spec):
                yield public_api.response(item)
        except RequestError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            log.exception("request %s failed", spec.request_id)
            self.orch.metrics.failed("INTERNAL")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the router: {type(e).__name__}: {e}")
        finally:
            self.live.discard(spec.request_id)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.info


class RouterServer:
    """Owns the worker pool, the orchestrator and the gRPC server; `start()` on the asyncio loop that serves."""

    def __init__(self, config: RouterConfig, model: ModelConfig, prefill: list[WorkerSpec],
                 decode: list[WorkerSpec]) -> None:
        self.config, self.model = config, model
        self.specs = (prefill, decode)
        self.pool: WorkerPool | None = None
        self.tokenizer = Tokenizer.from_model_dir(model.model_dir)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, max_model_len: int, worker_timeout_s: float = 300.0) -> int:
        """Wait for the workers, wire their KV channels, then serve; returns the bound port. The pool's gRPC
        channels belong to the running loop, so they are made here."""
        self.pool = WorkerPool(*self.specs, poll_interval_s=self.config.load_poll_interval_s)
        await self.pool.start(worker_timeout_s)
        # A request (prompt + completion) must fit the model and the smallest decode pool; a prompt must also
        # fit the smallest prefill pool (a prefill worker holds the prompt only).
        def pool_tokens(workers: list) -> list[int]:
            return [w.load.num_blocks * w.load.block_size for w in workers if w.load is not None]

        prefill_pools = pool_tokens(self.pool.prefill)
        limits = ModelLimits(os.path.basename(os.path.normpath(self.model.model_dir)), self.model.architecture,
                             self.model.vocab_size, min([max_model_len, *pool_tokens(self.pool.decode)]),
                             tuple(self.model.eos_token_ids), min(prefill_pools) - 1 if prefill_pools else None)
        self.orch = Orchestrator(self.config, self.pool, self.tokenizer)
        info = public_api.model_info(limits, self.tokenizer is not None, len(self.pool.prefill),
                                     len(self.pool.decode), self.pool.decode[0].spec.tensor_parallel_size)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        public_api.add_to_server(GenerationService(self.orch, limits, info), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (public_api.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        wanted = f"{self.config.host}:{self.config.port}"
        self.port = self.server.add_insecure_port(wanted)
        if not self.port:
            raise OSError(f"could not bind the router to {wanted} (port in use?)")
        await self.server.start()
        await self._set_health(True)
        log.info("router serving on %s", self.port)
        return self.port

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", public_api.SERVICE_NAME):
            r = self.health.set(service, status)
            if r is not None and hasattr(r, "__await__"):
                await r

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.server is not None:
            await self._set_health(False)
            await self.server.stop(grace_s)
        if self.pool is not None:
            await self.pool.stop()
