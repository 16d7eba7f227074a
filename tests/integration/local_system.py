"""A whole kvrelay system in this process, without Ray: prefill workers and a decode group (TP 1) on one small
checkpoint, and a router on a background asyncio loop. For tests that stop, break or probe workers directly."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from client import Client
from decode_workers.group import DecodeLeader
from engine import EngineConfig
from prefill_workers.worker import PrefillWorker
from protos.guards import secret_metadata
from router.config import RouterConfig
from router.server import RouterServer
from router.workers import WorkerSpec

SECRET = "local-system-test-secret"


@dataclass
class LocalSystem:
    cfg: EngineConfig
    prefill: list[PrefillWorker]
    decode: DecodeLeader
    router: RouterServer
    loop: asyncio.AbstractEventLoop
    client: Client
    target: str
    more_decode: list[DecodeLeader] = field(default_factory=list)

    metadata = secret_metadata(SECRET)

    def restart_prefill(self, i: int) -> PrefillWorker:
        """A fresh prefill worker with worker i's name and port (its predecessor must be stopped)."""
        old = self.prefill[i]
        new = PrefillWorker(old.name, self.cfg, secret=SECRET, port=old.port)
        self.prefill.append(new)
        return new

    def retries(self) -> float:
        m = self.router.metrics
        return m.registry.get_sample_value("kvrelay:request_retries_total", {"model_name": m.model_name}) or 0.0

    def wait_free(self, timeout_s: float = 10.0) -> None:
        """Until the decode group and every live prefill worker hold no block and no request."""
        deadline = time.monotonic() + timeout_s
        loops = [self.decode.loop] + [w.loop for w in self.prefill if not w.stopped]
        while any(x.stats.free_blocks != x.stats.num_blocks or x.stats.remote or x.stats.running for x in loops):
            assert time.monotonic() < deadline, [x.stats for x in loops]
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        asyncio.run_coroutine_threadsafe(self.router.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        for w in self.prefill:
            w.stop()
        for d in [self.decode, *self.more_decode]:
            d.stop()


def start_local(model_dir: str, num_prefill: int = 2, poll_interval_s: float = 0.05, num_decode: int = 1,
                **router_settings) -> LocalSystem:
    """`router_settings`: more RouterConfig fields (e.g. http_port=0). Decode groups past the first (d1, ...)
    are in `more_decode`."""
    cfg = EngineConfig.from_model_dir(model_dir, num_blocks=64, max_model_len=256)
    prefill = [PrefillWorker(f"p{i}", cfg, secret=SECRET) for i in range(num_prefill)]
    decode = DecodeLeader("d0", cfg, secret=SECRET)
    more = [DecodeLeader(f"d{g}", cfg, secret=SECRET) for g in range(1, num_decode)]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=0, load_poll_interval_s=poll_interval_s,
                                       stats_log_interval_s=0, **router_settings), cfg.model,
                          [WorkerSpec(w.name, w.address) for w in prefill],
                          [WorkerSpec(d.name, d.address) for d in [decode, *more]], secret=SECRET)
    port = asyncio.run_coroutine_threadsafe(router.start(256, 60), loop).result(90)
    target = f"127.0.0.1:{port}"
    return LocalSystem(cfg, prefill, decode, router, loop, Client(target, timeout=30), target, more)
