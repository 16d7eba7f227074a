"""`kvrelay serve`: start the workers on Ray, run the router here, print where to connect, and shut everything
down on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from deploy.config import ServeConfig
from deploy.launcher import Deployment, Placed
from deploy.supervisor import Supervisor
from router.server import RouterServer


async def run_router(cfg: ServeConfig, placed: Placed, stop: asyncio.Event | None = None,
                     deployment: Deployment | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM arrives). With the `deployment`, lost workers are restarted
    and rejoin (deploy.supervisor) up to cfg.max_restarts times each."""
    supervised = deployment is not None and cfg.max_restarts > 0
    router = RouterServer(cfg.router_config(), placed.prefill_config.model, placed.prefill, placed.decode,
                          secret=placed.secret, supervised=supervised)
    port = await router.start(placed.decode_config.scheduler.max_model_len, cfg.startup_timeout_s)
    supervisor = None
    if supervised:
        assert deployment is not None and router.pool is not None
        supervisor = Supervisor(deployment, router.pool, cfg.max_restarts, startup_timeout_s=cfg.startup_timeout_s)
        supervisor.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = "localhost" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    print(f"kvrelay is serving {placed.prefill_config.model.model_dir} on {host}:{port} "
          f"({len(placed.prefill)} prefill worker(s), {len(placed.decode)} decode group(s) of TP {cfg.decode_tp}, "
          f"{placed.device}). Try: kvrelay generate --target {host}:{port} \"Return a list of\"", flush=True)
    if router.http_port is not None:
        scheme = "https" if cfg.tls_cert else "http"
        print(f"kvrelay: OpenAI-compatible API at {scheme}://{host}:{router.http_port}/v1 (metrics on /metrics)",
              flush=True)
    try:
        await stop.wait()
    finally:
        print("kvrelay: shutting down", file=sys.stderr, flush=True)
        if supervisor is not None:
            await supervisor.stop()
        await router.stop()


def serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM during start-up tears down what was started, as Ctrl-C does

    signal.signal(signal.SIGTERM, interrupt)
    deployment = Deployment(cfg)
    try:
        placed = deployment.start()
        asyncio.run(run_router(cfg, placed, deployment=deployment))
    except KeyboardInterrupt:
        print("kvrelay: interrupted", file=sys.stderr)
    finally:
        deployment.stop()
    print("kvrelay: stopped", file=sys.stderr, flush=True)
    return 0
