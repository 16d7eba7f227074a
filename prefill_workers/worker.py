"""A prefill worker: its engine (with the KV connector as worker extension; in an engine core process of its own,
or on a thread here), and its gRPC server. Ray-free, so tests and single-machine tools can run one directly."""

from __future__ import annotations

import dataclasses

from engine.config import EngineConfig
from kv_transfer.wire import with_staging
from prefill_workers.service import PrefillService, add_to_server
from worker_runtime.drain import Drain
from worker_runtime.engine_core import start_engine
from worker_runtime.server_thread import AsyncServerThread

KV_CONNECTOR = "kv_transfer.connector:KVConnector"


class PrefillWorker:
    """Mutates: the engine it owns. `address` is where its gRPC service listens once constructed; every call must
    carry the deployment's `secret` (protos.guards)."""

    def __init__(self, name: str, config: EngineConfig, *, secret: str, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, port: int = 0) -> None:
        self.name = name
        config = dataclasses.replace(config, worker_extension=KV_CONNECTOR, detokenize=False,
                                     cache=with_staging(config))
        # The engine, in its core process unless RuntimeConfig.engine_process is off.
        self.loop = start_engine(name, config)
        self.engine = getattr(self.loop, "engine", None)  # the LLMEngine itself only in-process (tests poke it)
        self.drain = Drain()  # scaling down (worker_runtime.drain): set by its actor
        service = PrefillService(name, self.loop, self.drain)
        self.server = AsyncServerThread(lambda s: add_to_server(s, service), secret, bind_host, port, name)
        self.port = self.server.start()
        self.loop.deliver_on(self.server.loop)
        self.address = f"{advertise_host or bind_host}:{self.port}"
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.server.stop()
        self.loop.stop()
