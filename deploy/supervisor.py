"""Restart and rejoin: watches the deployment's workers, brings a lost one back and tells the router where it is.

Ray restarts a dead actor (its `__init__` runs again; it comes back idle, not serving). Every `interval_s` the
supervisor asks each worker's actors for their state; a worker is lost when an actor does not answer, is idle
(restarted by Ray) or reports its engine failed. A decode group is one unit: when any rank is lost the group's
other ranks are killed too, Ray restarts them all, and the group forms anew (its torch.distributed world cannot
take a rank back). Once every actor of the unit is idle, the supervisor starts it (the model loads) and hands the
address to the router's pool, which re-wires the KV channels between it and every peer and puts it back in
rotation; the surviving side is never restarted. After `max_restarts` restarts of one worker it gives up: the
actors are killed for good, a log line says so, and the router stops waiting for it (requests then fail
UNAVAILABLE when no capacity is left).

A worker drained on purpose (scale-down: SIGTERM to an actor's process, or `Deployment.drain`) reports "draining":
the router is told at once (no new work goes to it) and, once it reports "drained" or has exited, it is retired,
never restarted. A rank > 0 of a decode group that got the SIGTERM only asks; the supervisor drains rank 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from deploy.launcher import Deployment
from router.workers import WorkerPool

log = logging.getLogger("kvrelay.deploy")
# A live actor answers a state call in milliseconds; one that has not within this is being restarted (or hung).
STATE_TIMEOUT_S = 2.0


class Supervisor:
    """Mutates: the deployment's actors (kills, starts) and, through the pool, the router's view of them."""

    def __init__(self, deployment: Deployment, pool: WorkerPool, max_restarts: int, interval_s: float = 0.5,
                 startup_timeout_s: float = 600.0) -> None:
        self.deployment, self.pool = deployment, pool
        self.max_restarts, self.interval_s, self.startup_timeout_s = max_restarts, interval_s, startup_timeout_s
        self.restarts: dict[str, int] = {}  # worker name -> restarts so far
        self.recovery_s: dict[str, list[float]] = {}  # worker name -> seconds from loss to rejoined, per restart
        self.rejoined_at: dict[str, list[float]] = {}  # worker name -> time.monotonic() of each rejoin
        self.given_up: set[str] = set()
        self.draining: set[str] = set()  # workers seen draining (scale-down)
        self.drained: set[str] = set()  # workers that drained and left: retired, never restarted
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            for name, actors in self.deployment.units().items():
                if name in self.given_up or name in self.drained:
                    continue
                try:
                    states = await self._states(actors)
                    if "drained" in states or (name in self.draining and "gone" in states):
                        self._retire_drained(name, actors)
                    elif "draining" in states:
                        self._draining(name, actors)
                    elif any(s != "serving" for s in states):
                        await self._recover(name, actors, states)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let one worker's trouble stop the watch over the others
                    log.exception("supervising worker %s failed", name)
            await asyncio.sleep(self.interval_s)

    async def _states(self, actors: list[Any]) -> list[str]:
        """Each actor's state: "serving", "idle", "failed", or "gone" (no answer: dead, restarting or hung)."""
        async def one(a: Any) -> str:
            try:
                return await asyncio.wait_for(_aref(a.state.remote()), STATE_TIMEOUT_S)
            except Exception:  # RayActorError (dead or restarting) or the timeout
                return "gone"

        return list(await asyncio.gather(*(one(a) for a in actors)))

    async def _recover(self, name: str, actors: list[Any], states: list[str]) -> None:
        import ray

        lost_at = time.monotonic()
        why = ", ".join(f"rank {r} {s}" for r, s in enumerate(states) if s != "serving") if len(actors) > 1 \
            else states[0]
        self.pool.restarting(name, f"{name} is restarting ({why})")
        n = self.restarts.get(name, 0)
        if n >= self.max_restarts:
            self._give_up(name, actors, f"{name} was lost ({why}) and has been restarted {n} times already "
                          f"(--max-restarts {self.max_restarts}): given up")
            return
        self.restarts[name] = n + 1
        log.warning("worker %s lost (%s): restarting it (%d/%d)", name, why, n + 1, self.max_restarts)
        # Ranks still running (a group whose other rank died) restart too: the group forms anew as a whole.
        for a, s in zip(actors, states):
            if s in ("serving", "failed"):
                ray.kill(a, no_restart=False)
        deadline = time.monotonic() + self.startup_timeout_s
        while (states := await self._states(actors)) != ["idle"] * len(actors):
            if time.monotonic() > deadline:
                self._give_up(name, actors, f"{name} did not come back within {self.startup_timeout_s:.0f} s "
                              f"(states {states}): given up")
                return
            await asyncio.sleep(self.interval_s)
        address = await asyncio.wait_for(_aref(self.deployment.start_unit(name)), self.startup_timeout_s)
        if await self.pool.replace(name, address):
            took = time.monotonic() - lost_at
            self.recovery_s.setdefault(name, []).append(took)
            self.rejoined_at.setdefault(name, []).append(time.monotonic())
            log.warning("worker %s is back at %s after %.1f s", name, address, took)

    def _draining(self, name: str, actors: list[Any]) -> None:
        if name in self.draining:
            return
        self.draining.add(name)
        self.pool.draining(name)
        actors[0].drain.remote()  # a decode group's rank 0 drains the group, whichever rank was asked
        log.warning("worker %s is draining (scale-down): it leaves once its requests are done", name)

    def _retire_drained(self, name: str, actors: list[Any]) -> None:
        import ray

        self.drained.add(name)
        self.pool.retire(name, f"{name} drained (scaled down)")
        for a in actors:  # what is left of it (a decode group's other ranks): for good, never restarted
            ray.kill(a, no_restart=True)
        log.warning("worker %s drained and was retired", name)

    def _give_up(self, name: str, actors: list[Any], why: str) -> None:
        import ray

        log.error("%s", why)
        self.given_up.add(name)
        self.pool.retire(name, why)
        for a in actors:
            ray.kill(a, no_restart=True)


async def _aref(ref: Any) -> Any:
    """Await a Ray object ref on the running loop."""
    return await ref
