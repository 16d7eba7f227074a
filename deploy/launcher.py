"""Places kvrelay's workers on Ray: one actor per prefill worker (one GPU each), one actor per decode rank with
each decode group's ranks packed on one node (a STRICT_PACK placement group), started together; and takes them
down again. The router runs in the launching process (`deploy.serve`)."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from decode_workers.actor import DecodeRankActor
from deploy.config import ServeConfig
from engine.config import EngineConfig
from prefill_workers.actor import PrefillActor
from router.workers import WorkerSpec

log = logging.getLogger("kvrelay.deploy")


@dataclass
class Placed:
    """What `Deployment.start` placed: the router's view of the workers and the engine settings they run."""

    prefill: list[WorkerSpec]
    decode: list[WorkerSpec]
    prefill_config: EngineConfig
    decode_config: EngineConfig
    device: str
    # The internal API's per-deployment secret: the router sends it on every call to a worker. Never logged.
    secret: str = field(default="", repr=False)
    actors: list[Any] = field(default_factory=list)


class Deployment:
    """Mutates: the Ray actors and placement groups it creates (and the local Ray instance it may start)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.prefill_actors: list[Any] = []
        self.decode_actors: list[list[Any]] = []  # [group][rank]
        self.groups: list[Any] = []  # placement groups
        # Ray restarts a dead actor (its __init__ runs again) as often as asked; the supervisor
        # (deploy.supervisor) starts it, bounds the restarts to cfg.max_restarts and gives up after.
        self._restarts = -1 if cfg.max_restarts > 0 else 0
        self.started_ray = False
        # A fresh secret per deployment, handed to each actor through its constructor: only this process and the
        # workers it starts can call the internal API.
        self.secret = secrets.token_urlsafe(32)
        self.uid = secrets.token_hex(4)  # names this deployment's placement groups apart from another's

    @property
    def num_actors(self) -> int:
        return self.cfg.prefill_workers + self.cfg.decode_groups * self.cfg.decode_tp

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.cfg.address:
            ray.init(address=self.cfg.address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            # A local instance: CPU slots are logical (the actors share the cores anyway), so room for several
            # deployments' actors even on a small machine: a test or a benchmark may run two side by side.
            ray.init(num_cpus=max(os.cpu_count() or 1, 4 * self.num_actors), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)
            self.started_ray = True

    def _device(self) -> str:
        import ray

        if self.cfg.device != "auto":
            return self.cfg.device
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus >= self.num_actors:
            return "cuda"
        if gpus:
            log.warning("the cluster has %d GPUs but %d ranks need one each: running on CPU", gpus, self.num_actors)
        return "cpu"

    def _engine_config(self, device: str, num_blocks: int | None, tp: int) -> EngineConfig:
        c = self.cfg
        return EngineConfig.from_model_dir(
            os.path.abspath(c.model), dtype=c.dtype, device=device, block_size=c.block_size, num_blocks=num_blocks,
            gpu_memory_utilization=c.gpu_memory_utilization, max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            enable_prefix_caching=c.enable_prefix_caching, tensor_parallel_size=tp, load_format=c.load_format,
            runtime=c.runtime_config())

    def start(self) -> Placed:
        """Create and start every actor; returns once each has loaded its model and serves."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._init_ray()
        c = self.cfg
        device = self._device()
        gpu = device == "cuda"
        prefill_cfg = self._engine_config(device, c.prefill_num_blocks, 1)
        decode_cfg = self._engine_config(device, c.decode_num_blocks, c.decode_tp)
        res = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        t0 = time.monotonic()

        decode_cls = ray.remote(DecodeRankActor)
        for g in range(c.decode_groups):
            pg = placement_group([bundle] * c.decode_tp, strategy="STRICT_PACK",
                                 name=f"kvrelay-decode-{g}-{self.uid}")
            self.groups.append(pg)
            ray.get(pg.ready(), timeout=c.startup_timeout_s)
            self.decode_actors.append([
                decode_cls.options(max_restarts=self._restarts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=r), **res).remote(f"decode-{g}", decode_cfg, r, self.secret)
                for r in range(c.decode_tp)])

        # Prefill actors after the decode groups' packed placements, so they cannot fragment a node's GPUs.
        prefill_cls = ray.remote(PrefillActor)
        names = [f"prefill-{i}" for i in range(c.prefill_workers)]
        self.prefill_actors = [prefill_cls.options(max_restarts=self._restarts, **res).remote(n, prefill_cfg,
                                                                                               self.secret)
                               for n in names]
        prefill_addrs = [a.start.remote() for a in self.prefill_actors]
        group_addrs = [self.start_group(g) for g in range(c.decode_groups)]
        got_prefill = ray.get(prefill_addrs, timeout=c.startup_timeout_s)
        got_decode = [ray.get(refs, timeout=c.startup_timeout_s)[0] for refs in group_addrs]
        log.info("workers started in %.1f s on %s", time.monotonic() - t0, device)
        return Placed(prefill=[WorkerSpec(n, a, 1) for n, a in zip(names, got_prefill)],
                      decode=[WorkerSpec(f"decode-{g}", a, c.decode_tp) for g, a in enumerate(got_decode)],
                      prefill_config=prefill_cfg, decode_config=decode_cfg, device=device, secret=self.secret)

    def units(self) -> dict[str, list[Any]]:
        """Each worker's name and its actors: a prefill worker's one, a decode group's ranks (rank 0 first)."""
        out = {f"prefill-{i}": [a] for i, a in enumerate(self.prefill_actors)}
        out.update({f"decode-{g}": ranks for g, ranks in enumerate(self.decode_actors)})
        return out

    def start_group(self, g: int) -> list[Any]:
        """Start decode group g's ranks, all at once (the group forms together); refs of their `start`, rank 0's
        is the group's address."""
        import ray

        ranks = self.decode_actors[g]
        init = ray.get(ranks[0].init_method.remote(), timeout=self.cfg.startup_timeout_s) \
            if self.cfg.decode_tp > 1 else None
        return [a.start.remote(init) for a in ranks]

    def start_unit(self, name: str) -> Any:
        """Start worker `name`'s (restarted, idle) actors; a ref to its address."""
        if name.startswith("prefill-"):
            return self.prefill_actors[int(name.split("-")[1])].start.remote()
        return self.start_group(int(name.split("-")[1]))[0]

    def drain(self, name: str, timeout_s: float = 30.0) -> None:
        """Scale worker `name` ("prefill-0", "decode-1") down: it refuses new work, finishes what it has, then
        exits; the supervisor retires it (never restarts it). Returns once draining has begun. The same as
        `kill -TERM <pid>` of its actor (a decode group's: any rank)."""
        import ray

        ray.get(self.units()[name][0].drain.remote(), timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the engines cleanly where they answer, then kill every actor and release the placements."""
        import ray

        if not ray.is_initialized():
            return
        leaders = self.prefill_actors + [ranks[0] for ranks in self.decode_actors]
        try:
            ray.get([a.stop.remote() for a in leaders], timeout=timeout_s)
        except Exception as e:  # a dead or stuck actor: killing it below is all that is left
            log.warning("some workers did not stop cleanly: %s", e)
        for a in self.prefill_actors + [a for ranks in self.decode_actors for a in ranks]:
            ray.kill(a)
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self.prefill_actors, self.decode_actors, self.groups = [], [], []
        if self.started_ray:
            ray.shutdown()
