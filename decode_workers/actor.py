"""One rank of a decode group as a Ray actor (the deployment wraps this class with `ray.remote`, one GPU or CPU
bundle each, the group's bundles packed on one node). Rank 0 hosts the engine and the gRPC service."""

from __future__ import annotations

import os
import socket

from decode_workers.group import DecodeFollower, DecodeLeader
from engine.config import EngineConfig
from worker_runtime.drain import DrainingActor, drain_in_background, exit_actor_soon, on_sigterm
from worker_runtime.server_thread import node_ip


class DecodeRankActor(DrainingActor):
    def __init__(self, name: str, config: EngineConfig, rank: int, secret: str) -> None:
        self.name, self.config, self.rank = name, config, rank
        self._secret = secret  # the deployment's: every call to rank 0's service must carry it
        self.leader: DecodeLeader | None = None
        self.follower: DecodeFollower | None = None
        self.drained = False  # it drained on purpose (scale-down): its supervisor retires it, never restarts it
        # A rank > 0 cannot drain the group itself: it asks, and the supervisor drains rank 0.
        self.drain_asked = False
        on_sigterm(self.drain)  # `kill -TERM <pid>` drains the group (worker_runtime.drain)

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
        "serving", "failed" (its engine died, or a follower left its loop: a rank of the group is gone),
        "draining" (scaling down, or asked to) or "drained" (rank 0 done, about to exit)."""
        if self.drained:
            return "drained"
        if self.leader is None and self.follower is None:
            return "idle"
        if not self.ping():
            return "failed"
        draining = self.drain_asked or (self.leader is not None and self.leader.drain.draining)
        return "draining" if draining else "serving"

    def drain(self) -> None:
        """Scale down the group (rank 0): refuse new requests, finish those it has, then stop the group and exit
        (idempotent). On another rank it only asks (state "draining"): the supervisor drains rank 0."""
        if self.leader is None:
            self.drain_asked = True
            if self.follower is None:  # never started
                self.drained = True
                exit_actor_soon()
        elif not self.leader.drain.draining:
            drain_in_background(self.name, self.leader.drain, self.leader.loop, self._drained)

    def stop(self) -> None:
        """Rank 0 stops the group: its engine tells the followers to leave their loops."""
        if self.leader is not None:
            self.leader.stop()
            self.leader = None
