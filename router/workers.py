"""The router's pool of workers: their clients, what it knows of their load and caches, KV channel wiring, and
the poll loop that keeps load and health fresh."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import KVLayout
from router.policy import WorkerView
from router.prefix_index import PrefixIndex
from router.worker_api import DecodeClient, Load, PrefillClient, WorkerError

log = logging.getLogger("kvrelay.router")


@dataclass(frozen=True)
class WorkerSpec:
    """Where a worker (a prefill worker, or rank 0 of a decode group) serves, and its tensor-parallel size."""

    name: str
    address: str
    tensor_parallel_size: int = 1


class KVLayoutMismatch(RuntimeError):
    """A prefill worker and a decode group cannot exchange KV (different model, dtype, block size or wire)."""


@dataclass
class Worker:
    spec: WorkerSpec
    client: PrefillClient | DecodeClient
    view: WorkerView
    load: Load | None = None
    index: PrefixIndex | None = None  # prefill workers: the router's view of their prefix cache
    error: str = ""  # why it is unhealthy
    wired: set[str] = field(default_factory=set)  # decode groups this prefill worker has KV channels to
    retired: bool = False  # its supervisor gave up restarting it: it never comes back
    restarting: bool = False  # its supervisor is restarting it: a surviving rank's answers do not count

    @property
    def name(self) -> str:
        return self.spec.name


class WorkerPool:
    """Mutates: workers' views (load polls, health) and prefix indexes."""

    def __init__(self, prefill: list[WorkerSpec], decode: list[WorkerSpec], *, secret: str,
                 poll_interval_s: float = 0.2, on_load: Callable[[Load], None] | None = None,
                 supervised: bool = False) -> None:
        if not decode:
            raise ValueError("the router needs at least one decode group (and prefill workers, or none for "
                             "aggregated serving)")
        names = [w.name for w in prefill + decode]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique, got {names}")
        self.prefill = [Worker(s, PrefillClient(s.address, secret, s.name), WorkerView(s.name)) for s in prefill]
        self.decode = [Worker(s, DecodeClient(s.address, secret, s.name), WorkerView(s.name)) for s in decode]
        self.poll_interval_s = poll_interval_s
        self._secret = secret  # for the clients of restarted workers; never logged
        # Supervised: a deployment restarts lost workers (deploy.supervisor), so an unhealthy worker is expected
        # back until it is retired, and requests wait for it rather than fail.
        self.supervised = supervised
        self.on_load = on_load  # sees every polled load (the router's per-worker gauges)
        self._poller: asyncio.Task | None = None

    @property
    def all(self) -> list[Worker]:
        return self.prefill + self.decode

    async def start(self, timeout_s: float = 120.0) -> None:
        """Wait until every worker answers, open the KV channels of every (prefill, decode) pair, then poll."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        for w in self.all:
            while not await self._poll(w):
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"worker {w.name} at {w.spec.address} did not answer within {timeout_s:.0f} "
                                       f"s: {w.error}")
                await asyncio.sleep(0.2)
        for w in self.all:  # prefill workers; decode groups too, which prefill when there are no prefill workers
            assert w.load is not None
            w.index = PrefixIndex(max(w.load.num_blocks, 1))
        await self.wire()
        self._poller = asyncio.create_task(self._poll_loop())

    async def wire(self) -> None:
        """KV channels: each decode group listens for each prefill worker, which then connects."""
        for p in self.prefill:
            for d in self.decode:
                if d.name not in p.wired:
                    await self._wire_pair(p, d)

    async def _wire_pair(self, p: Worker, d: Worker) -> None:
        assert isinstance(d.client, DecodeClient) and isinstance(p.client, PrefillClient)
        p_layout = p.load.kv_layout if p.load is not None else None
        d_layout = d.load.kv_layout if d.load is not None else None
        if p_layout is not None and d_layout is not None:  # the compatibility handshake, before any channel opens
            why = KVLayout(**p_layout).mismatch(KVLayout(**d_layout), f"prefill worker {p.name}",
                                                f"decode group {d.name}")
            if why is not None:
                raise KVLayoutMismatch(why)
        channels = await d.client.listen(p.name, p.spec.tensor_parallel_size)
        await p.client.connect(d.name, d.spec.tensor_parallel_size, channels, d_layout)
        p.wired.add(d.name)
        log.info("KV channels %s -> %s ready (%d)", p.name, d.name, len(channels))

    def coming_back(self, workers: list[Worker]) -> bool:
        """Whether capacity of this kind is expected back: a supervised worker not retired."""
        return self.supervised and any(not w.retired for w in workers)

    def find(self, name: str) -> Worker:
        return next(w for w in self.all if w.name == name)

    async def replace(self, name: str, address: str) -> bool:
        """Worker `name` was restarted (at `address`, maybe a new one): a fresh client and empty cache index, its
        KV channels to every peer wired anew, then back in rotation once it answers healthy. True when wired."""
        w = self.find(name)
        old = w.client
        w.restarting = False
        w.spec = dataclasses.replace(w.spec, address=address)
        w.client = type(old)(address, self._secret, name)
        w.wired.clear()
        for p in self.prefill:
            p.wired.discard(name)
        await old.close()
        if not await self._poll(w):
            return False
        assert w.load is not None
        w.index = PrefixIndex(max(w.load.num_blocks, 1))  # its prefix cache starts empty
        # Its pairs with every healthy peer (a peer that is down itself is wired when it rejoins).
        pairs = [(w, d) for d in self.decode if d.view.healthy] if w in self.prefill else \
            [(p, w) for p in self.prefill if p.view.healthy]
        for p, d in pairs:
            try:
                await self._wire_pair(p, d)
            except (WorkerError, KVLayoutMismatch) as e:
                log.error("worker %s rejoined at %s but KV channels %s -> %s could not be wired: %s", name, address,
                          p.name, d.name, e)
                w.view.healthy, w.error = False, f"{name}: KV channels {p.name} -> {d.name} not wired ({e})"
                return False
        log.warning("worker %s rejoined at %s", name, address)
        return True

    def restarting(self, name: str, why: str) -> None:
        """Its supervisor is restarting worker `name`: out of rotation until `replace` (a decode group's surviving
        rank 0 still answers polls healthy until it is killed, but the group is gone)."""
        w = self.find(name)
        w.restarting, w.view.healthy, w.error = True, False, why

    def draining(self, name: str) -> None:
        """Worker `name` is scaling down (its supervisor or a refusal says so): no new work goes to it."""
        self.find(name).view.draining = True

    def retire(self, name: str, why: str) -> None:
        """Its supervisor gave up on worker `name`: unhealthy for good, and no longer waited for."""
        w = self.find(name)
        w.retired, w.view.healthy, w.error = True, False, why

    async def rewire(self, p: Worker, d: Worker) -> None:
        """Replace a pair's KV channels (after a transfer between them failed); errors are logged, not raised:
        the next transfer on the pair fails again and the request is retried or reported."""
        p.wired.discard(d.name)
        try:
            await self._wire_pair(p, d)
        except WorkerError as e:
            log.warning("re-wiring KV channels %s -> %s failed: %s", p.name, d.name, e)

    async def _poll(self, w: Worker) -> bool:
        if w.retired or w.restarting:
            return False
        try:
            load = await w.client.load(timeout_s=max(2.0, 5 * self.poll_interval_s))
        except WorkerError as e:
            if w.view.draining:  # it drained and exited (scale-down): out of rotation for good, not a failure
                log.warning("worker %s drained and left", w.name)
                self.retire(w.name, f"{w.name} drained (scaled down)")
                return False
            if w.view.healthy:
                log.warning("worker %s is unreachable: %s", w.name, e)
            w.view.healthy, w.error = False, f"{w.name} is unreachable ({e.code}: {e.details})"
            return False
        w.load = load
        if self.on_load is not None:
            self.on_load(load)
        v = w.view
        v.free_blocks, v.num_blocks, v.running, v.waiting = load.free_blocks, load.num_blocks, load.running, \
            load.waiting
        if v.healthy and not load.healthy:
            log.error("worker %s reports it is unhealthy: %s", w.name, load.error)
        v.healthy, w.error = load.healthy, load.error
        if load.draining and not v.draining:
            log.warning("worker %s is draining: no new work goes to it", w.name)
        v.draining = v.draining or load.draining  # a worker never stops draining: it exits
        return load.healthy

    async def _poll_loop(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self._poll(w) for w in self.all))
            except Exception:  # never let one bad poll freeze every worker's load and health for good
                log.exception("polling worker load failed")
            await asyncio.sleep(self.poll_interval_s)

    async def check(self, w: Worker) -> bool:
        """Poll one worker now (after a failed call): True if it is healthy."""
        return await self._poll(w)

    def mark_unhealthy(self, w: Worker, error: str) -> None:
        """A call failed as if the worker were gone: route around it until a poll finds it healthy again."""
        w.view.healthy, w.error = False, error

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        for w in self.all:
            await w.client.close()
