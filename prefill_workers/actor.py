"""The prefill worker as a Ray actor (the deployment wraps this class with `ray.remote` and gives it one GPU,
or CPUs). Ray is imported lazily so the class stays importable, and testable, without it."""

from __future__ import annotations

import dataclasses
import os

from engine.config import EngineConfig
from prefill_workers.worker import PrefillWorker
from worker_runtime.drain import DrainingActor, drain_in_background, exit_actor_soon, on_sigterm
from worker_runtime.server_thread import node_ip


class PrefillActor(DrainingActor):
    def __init__(self, name: str, config: EngineConfig, secret: str) -> None:
        self.name, self.config = name, config
        self._secret = secret  # the deployment's: every call to this worker's service must carry it
        self.worker: PrefillWorker | None = None
        self.drained = False  # it drained on purpose (scale-down): its supervisor retires it, never restarts it
        on_sigterm(self.drain)  # `kill -TERM <pid>` drains (worker_runtime.drain)

    def start(self, port: int = 0) -> str:
        """Load the model, start the engine and the gRPC service; returns "host:port" to reach it."""
        ip = node_ip()
        os.environ["KVRELAY_KV_HOST"] = ip  # where this worker's KV channel stores are advertised
        config = self.config
        if config.device.startswith("cuda"):
            config = dataclasses.replace(config, device="cuda:0")  # Ray shows the actor its own GPU only
        # Bound to the node's address only (what the router reaches), never every interface.
        self.worker = PrefillWorker(self.name, config, secret=self._secret, bind_host=ip, port=port)
        return self.worker.address

    def ping(self) -> bool:
        return self.worker is not None and self.worker.loop.error is None

    def state(self) -> str:
        """For the deployment's supervisor: "idle" (constructed, not started: e.g. just restarted by Ray),
        "serving", "failed" (its engine died), "draining" (scaling down) or "drained" (about to exit)."""
        if self.drained:
            return "drained"
        if self.worker is None:
            return "idle"
        if self.worker.loop.error is not None:
            return "failed"
        return "draining" if self.worker.drain.draining else "serving"

    def drain(self) -> None:
        """Scale down: refuse new prompts, finish those it has, then stop and exit (idempotent)."""
        if self.worker is None:
            self.drained = True
            exit_actor_soon()
        elif not self.worker.drain.draining:
            drain_in_background(self.name, self.worker.drain, self.worker.loop, self._drained)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
