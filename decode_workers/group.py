"""A decode group's ranks as process-level objects (Ray-free): `DecodeLeader` is rank 0 (engine, scheduler,
sampling, gRPC service); `DecodeFollower` is any other rank, which joins rank 0's tensor-parallel group and runs
every step rank 0 broadcasts. With tensor_parallel_size 1 the leader is the whole group."""

from __future__ import annotations

import dataclasses
import threading

from decode_workers.service import DecodeService, add_to_server
from engine.config import EngineConfig
from engine.worker import TPWorker, run_follower
from kv_transfer.wire import with_staging
from worker_runtime.drain import Drain
from worker_runtime.engine_core import start_engine
from worker_runtime.server_thread import AsyncServerThread

KV_CONNECTOR = "kv_transfer.connector:KVConnector"


def group_config(config: EngineConfig) -> EngineConfig:
    """Every rank runs the KV connector, whose staging is kept out of the KV pool; rank 0 streams token ids (the
    router detokenizes)."""
    return dataclasses.replace(config, worker_extension=KV_CONNECTOR, detokenize=False,
                               cache=with_staging(config))


class DecodeLeader:
    """Rank 0. For tensor_parallel_size > 1, construct it while every follower joins `init_method` too (the
    group forms when all ranks have joined). Every call to its service must carry the deployment's `secret`
    (protos.guards). Mutates: the engine it owns."""

    def __init__(self, name: str, config: EngineConfig, init_method: str | None = None, device: str | None = None,
                 *, secret: str, bind_host: str = "127.0.0.1", advertise_host: str | None = None,
                 port: int = 0) -> None:
        self.name = name
        config = group_config(config)
        if config.parallel.tensor_parallel_size > 1:
            if init_method is None:
                raise ValueError("a decode group of several ranks needs the init_method its followers join")
        elif device is not None:
            config = dataclasses.replace(config, device=device)
        # The engine, in its core process (rank 0's TPWorker there) unless RuntimeConfig.engine_process is off.
        self.loop = start_engine(name, config, init_method, device)
        self.engine = getattr(self.loop, "engine", None)  # the LLMEngine itself only in-process (tests poke it)
        self.drain = Drain()  # scaling down (worker_runtime.drain): set by its actor
        service = DecodeService(name, self.loop, self.drain)
        self.server = AsyncServerThread(lambda s: add_to_server(s, service), secret, bind_host, port, name)
        self.port = self.server.start()
        self.loop.deliver_on(self.server.loop)
        self.address = f"{advertise_host or bind_host}:{self.port}"
        self.stopped = False

    def stop(self) -> None:
        """Stops serving, then the engine: rank 0 tells the followers to leave their loops."""
        if self.stopped:
            return
        self.stopped = True
        self.server.stop()
        self.loop.stop()


class DecodeFollower:
    """Rank > 0: joins the group (blocks until every rank has joined), then follows rank 0 on a thread."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, device: str | None = None) -> None:
        self.worker = TPWorker(group_config(config), rank, init_method, device)
        self.thread = threading.Thread(target=run_follower, args=(self.worker,), name=f"kvrelay-tp{rank}",
                                       daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()
