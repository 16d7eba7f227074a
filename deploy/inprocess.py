"""A whole kvrelay deployment driven from this process: Ray actors placed by `deploy.launcher`, the router on a
background asyncio loop, and (optionally) the supervisor that restarts lost workers, as `kvrelay serve` runs them;
plus helpers to read the workers' KV state over the internal API. For tests and local benchmarks (bench.chaos)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc

from deploy.config import ServeConfig
from deploy.launcher import Deployment, Placed
from deploy.supervisor import Supervisor
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc
from protos.guards import secret_metadata
from router.server import RouterServer


@dataclass
class Served:
    cfg: ServeConfig
    placed: Placed
    deployment: Deployment
    router: RouterServer
    loop: asyncio.AbstractEventLoop
    target: str
    supervisor: Supervisor | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a call to the internal API must carry: the deployment's secret."""
        return secret_metadata(self.placed.secret)

    def loads(self) -> list[wpb.WorkerLoad]:
        """Every worker's load (prefill workers first), at the addresses the router knows now (a restarted
        worker's may have changed)."""
        out = []
        assert self.router.pool is not None
        for w in self.router.pool.all:
            if w.retired:  # gone for good (given up on, or drained): nothing answers there
                continue
            with grpc.insecure_channel(w.spec.address) as ch:
                stub = (wpb_grpc.PrefillWorkerStub(ch) if w in self.router.pool.prefill
                        else wpb_grpc.DecodeGroupStub(ch))
                out.append(stub.GetLoad(wpb.LoadRequest(), timeout=10, metadata=self.metadata))
        return out

    def wait_all_free(self, timeout_s: float = 20.0) -> list[wpb.WorkerLoad]:
        """Wait until no worker holds a request or a block; returns the loads (fails the test on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            loads = self.loads()
            if all(x.free_blocks == x.num_blocks and x.running == 0 and x.waiting == 0 for x in loads):
                return loads
            if time.monotonic() > deadline:
                raise AssertionError(f"blocks or requests still held: {[str(x) for x in loads]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.supervisor is not None:
            asyncio.run_coroutine_threadsafe(self.supervisor.stop(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.router.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.deployment.stop()


def serve_in_process(cfg: ServeConfig, supervise: bool = False) -> Served:
    """Start `cfg`'s deployment and its router here; `supervise`: lost workers are restarted and rejoin
    (deploy.supervisor), as `kvrelay serve` does."""
    deployment = Deployment(cfg)
    placed = deployment.start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="kvrelay-router").start()
    router = RouterServer(cfg.router_config(), placed.prefill_config.model, placed.prefill, placed.decode,
                          secret=placed.secret, supervised=supervise)
    try:
        port = asyncio.run_coroutine_threadsafe(router.start(cfg.max_model_len or 512, 300), loop).result(320)
    except BaseException:
        deployment.stop()
        raise
    served = Served(cfg, placed, deployment, router, loop, f"127.0.0.1:{port}")
    if supervise:
        async def watch() -> Supervisor:
            assert router.pool is not None
            sup = Supervisor(deployment, router.pool, cfg.max_restarts, interval_s=0.2, startup_timeout_s=120)
            sup.start()
            return sup

        served.supervisor = asyncio.run_coroutine_threadsafe(watch(), loop).result(10)
    return served
