"""One rank of a decode group as a Ray actor (the deployment wraps this class with `ray.remote`, one GPU or CPU
bundle each, the group's bundles packed on one node). Rank 0 hosts the engine and the gRPC service."""

from __future__ import annotations

import os
import socket

from decode_workers.group import DecodeFollower, DecodeLeader
from engine.config import EngineConfig
from worker_runtime.server_thread import node_ip


class DecodeRankActor:
    def __init__(self, name: str, config: EngineConfig, rank: int, secret: str) -> None:
        self.name, self.config, self.rank = name, config, rank
        self._secret = secret  # the deployment's: every call to rank 0's service must carry it
        self.leader: DecodeLeader | None = None
        self.follower: DecodeFollower | None = None

    def init_method(self) -> str:
        """Rank 0: the rendezvous address of the group's torch.distributed world (a free port on this node)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{node_ip()}:{port}"

    def start(self, init_method: str | None, port: int = 0) -> str | None:
        """Join the group (every rank's `start` must run at once) and load this rank's shard. Rank 0 returns
        "host:port" of the group's gRPC service; other ranks None."""
        ip = node_ip()
        os.environ["KVRELAY_KV_HOST"] = ip
        device = "cuda:0" if self.config.device.startswith("cuda") else None  # Ray shows each rank its own GPU
        if self.rank == 0:
            # Bound to the node's address only (what the router reaches), never every interface.
            self.leader = DecodeLeader(self.name, self.config, init_method, device, secret=self._secret,
                                       bind_host=ip, port=port)
            return self.leader.address
        assert init_method is not None
        self.follower = DecodeFollower(self.config, self.rank, init_method, device)
        return None

    def ping(self) -> bool:
        if self.leader is not None:
            return self.leader.loop.error is None
        return self.follower is not None and self.follower.running

    def state(self) -> str:
        """For the deployment's supervisor: "idle" (constructed, not started: e.g. just restarted by Ray),
        "serving", or "failed" (its engine died, or a follower left its loop: a rank of the group is gone)."""
        if self.leader is None and self.follower is None:
            return "idle"
        return "serving" if self.ping() else "failed"

    def stop(self) -> None:
        """Rank 0 stops the group: its engine tells the followers to leave their loops."""
        if self.leader is not None:
            self.leader.stop()
            self.leader = None
