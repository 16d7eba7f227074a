"""The router's gRPC server: the public Generation service, plus the standard grpc.health.v1 health service and
server reflection. Maps request failures to status codes with messages that say what to fix."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from protos.guards import SERVER_OPTIONS, server_interceptors
from router import public_api
from router.auth import ApiKeyInterceptor
from router.config import RouterConfig
from router.errors import INVALID_ARGUMENT, RequestError
from router.intake import Intake
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.requests import ModelLimits
from router.workers import WorkerPool, WorkerSpec

log = logging.getLogger("kvrelay.router")


class GenerationService(public_api.GenerationServicer):
    def __init__(self, intake: Intake, info: Any) -> None:
        self.intake, self.info = intake, info

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        prompt, sampling, rid = public_api.parse(request)
        try:
            spec = await self.intake.admit(prompt, sampling, rid)
            async for item in self.intake.run(spec):
                yield public_api.response(item)
        except RequestError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.info


class RouterServer:
    """Owns the worker pool, the orchestrator and the gRPC server; `start()` on the asyncio loop that serves."""

    def __init__(self, config: RouterConfig, model: ModelConfig, prefill: list[WorkerSpec],
                 decode: list[WorkerSpec], *, secret: str, supervised: bool = False) -> None:
        self.config, self.model = config, model
        self._secret = secret  # the internal API's, for the worker clients; never logged
        self.specs = (prefill, decode)
        self.supervised = supervised  # lost workers are restarted (deploy.supervisor): requests wait for them
        self.pool: WorkerPool | None = None
        self.tokenizer = Tokenizer.from_model_dir(model.model_dir)
        self.server: grpc.aio.Server | None = None
        self.http = None  # router.http.server.HttpServer when config.http_port is set
        self.port = 0
        self.http_port: int | None = None
        # The name clients use for the model (requests, /v1/models) labels every metric too.
        self.model_name = config.served_model_name or os.path.basename(os.path.normpath(model.model_dir))
        self.metrics = RouterMetrics(self.model_name)
        self.serving = False  # the router's own life: started and not stopping
        self.published: bool | None = None  # what grpc.health.v1 says now (SERVING = True)
        self._stats_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None

    async def start(self, max_model_len: int, worker_timeout_s: float = 300.0) -> int:
        """Wait for the workers, wire their KV channels, then serve; returns the bound port. The pool's gRPC
        channels belong to the running loop, so they are made here."""
        m = self.metrics
        self.pool = WorkerPool(*self.specs, secret=self._secret, poll_interval_s=self.config.load_poll_interval_s,
                               on_load=lambda load: (
            m.worker_load(load.name, load.running, load.waiting, load.num_blocks, load.free_blocks,
                          load.num_preemptions)), supervised=self.supervised)
        await self.pool.start(worker_timeout_s)
        # A request (prompt + completion) must fit the model and the smallest decode pool; a prompt must also
        # fit the smallest prefill pool (a prefill worker holds the prompt only).
        def pool_tokens(workers: list) -> list[int]:
            return [w.load.num_blocks * w.load.block_size for w in workers if w.load is not None]

        prefill_pools = pool_tokens(self.pool.prefill)
        model_len = min([max_model_len, *pool_tokens(self.pool.decode)])
        max_prompt = min(prefill_pools) - 1 if prefill_pools else None
        limits = ModelLimits(os.path.basename(os.path.normpath(self.model.model_dir)), self.model.architecture,
                             self.model.vocab_size, model_len, tuple(self.model.eos_token_ids), max_prompt,
                             self._max_prompt_chars(min(model_len - 1, max_prompt or model_len)))
        self.orch = Orchestrator(self.config, self.pool, self.tokenizer, self.metrics, _kv_bytes_per_token(self.model),
                                 tuple(self.model.eos_token_ids))
        self.intake = Intake(self.orch, limits)
        info = public_api.model_info(limits, self.tokenizer is not None, len(self.pool.prefill),
                                     len(self.pool.decode), self.pool.decode[0].spec.tensor_parallel_size)
        key = self.config.api_key
        # The key check first (a refused call is refused whatever its bytes), then the parse guard.
        # Both count what they refuse in the error-status counter, as the intake counts what it refuses.
        interceptors = ([ApiKeyInterceptor(key, self.metrics.failed)] if key is not None else []) + \
            server_interceptors(None, on_undecodable=lambda: self.metrics.failed(INVALID_ARGUMENT))
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        public_api.add_to_server(GenerationService(self.intake, info), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (public_api.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        wanted = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            with open(self.config.tls_key, "rb") as k, open(self.config.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.server.add_secure_port(wanted, creds)
        else:
            self.port = self.server.add_insecure_port(wanted)
        if not self.port:
            raise OSError(f"could not bind the router to {wanted} (port in use?)")
        if self.config.http_port is not None:
            await self._start_http()
        await self.server.start()
        await self._set_health(True)
        self._health_task = asyncio.create_task(self._watch_health())
        if self.config.stats_log_interval_s:
            self._stats_task = asyncio.create_task(self._log_stats(self.config.stats_log_interval_s))
        log.info("router serving gRPC on %s%s", self.port,
                 f", HTTP on {self.http_port}" if self.http_port is not None else "")
        return self.port

    def _max_prompt_chars(self, max_prompt_tokens: int) -> int | None:
        """The configured bound, else the most characters `max_prompt_tokens` tokens can spell (None without a
        tokenizer: then no text is accepted at all)."""
        if self.config.max_prompt_chars is not None:
            return self.config.max_prompt_chars
        return max_prompt_tokens * self.tokenizer.max_token_chars() if self.tokenizer is not None else None

    async def _start_http(self) -> None:
        from router.http.app import build_app  # FastAPI and uvicorn only load for a router that serves HTTP
        from router.http.chat_template import ChatTemplate
        from router.http.frontend import Frontend
        from router.http.logprobs import TokenTexts
        from router.http.server import HttpServer

        template = ChatTemplate.load(self.model.model_dir, self.config.chat_template, self.tokenizer,
                                     self.model.bos_token_id, tuple(self.model.eos_token_ids))
        front = Frontend(self.intake, self.model_name, template,
                         TokenTexts(self.tokenizer), self.config.api_key, self.health_state)
        self.http = HttpServer(build_app(front), self.config.host, self.config.http_port or 0, self.config.tls_cert,
                               self.config.tls_key)
        self.http_port = await self.http.start()

    def health_state(self) -> tuple[bool, str]:
        """(serving, why not): serving needs a healthy decode group, and a healthy prefill worker if any."""
        if not self.serving or self.pool is None:
            return False, "the router is not serving (starting or stopping)"
        for kind, workers in (("prefill worker", self.pool.prefill), ("decode group", self.pool.decode)):
            if workers and not any(w.view.healthy for w in workers):
                return False, f"no healthy {kind}: " + "; ".join(w.error for w in workers if w.error)
        return True, ""

    async def _log_stats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            assert self.pool is not None
            views = [w.view for w in self.pool.all]
            log.info("%s", self.metrics.stats_line(sum(v.running for v in views), sum(v.waiting for v in views),
                                                   self.orch.room.waiting))

    async def _set_health(self, serving: bool) -> None:
        self.serving = serving
        await self._publish_health()

    async def _watch_health(self) -> None:
        """Follow the load poll: NOT_SERVING while no capacity is left (no healthy prefill worker in a
        disaggregated deployment, or no healthy decode group), so load balancers and probes stop sending
        traffic; SERVING again once a worker is back."""
        while True:
            await asyncio.sleep(self.config.load_poll_interval_s)
            await self._publish_health()

    async def _publish_health(self) -> None:
        ok, why = self.health_state()
        if ok == self.published:
            return
        if self.serving and self.published is not None:  # capacity changed (not the router starting, stopping)
            if ok:
                log.warning("capacity is back: health is SERVING again")
            else:
                log.error("health is NOT_SERVING: %s", why)
        self.published = ok
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", public_api.SERVICE_NAME):
            r = self.health.set(service, status)
            if r is not None and hasattr(r, "__await__"):
                await r

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in (self._stats_task, self._health_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.server is not None:
            await self._set_health(False)
            await self.server.stop(grace_s)
        if self.http is not None:
            await self.http.stop()
        if self.pool is not None:
            await self.pool.stop()


def _kv_bytes_per_token(model: ModelConfig) -> int:
    """Bytes of one token's KV across all layers (keys and values), as the workers store it."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(model.dtype, 4)
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * itemsize
