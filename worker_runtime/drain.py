"""Draining, the clean way a worker leaves (scale-down): it refuses new Prefill/Decode/Generate calls with
UNAVAILABLE "... is draining" (the router places them elsewhere), its load reports `draining`, the requests it has
run to completion, and once it holds none it stops and its process exits.

Under Ray a worker is an actor whose methods run on the process's main thread (a sync actor of concurrency 1), so
`signal.signal` in its constructor works, and Ray's task loop runs Python signal handlers within milliseconds even
while idle: `kill -TERM <pid>` drains. The exit goes through `ray.actor.exit_actor()` inside a task the actor
sends itself: an intended exit, which Ray does not restart (a `sys.exit` from the handler would count as a crash
and be restarted).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import grpc

from protos.codec import DRAINING
from worker_runtime.handle import EngineHandle
from worker_runtime.rpc import Refusal

log = logging.getLogger("kvrelay.worker")
# Draining lasts this long at least, so the router's next load poll (and the supervisor's) sees it before the
# worker is gone; then it waits for its last request.
MIN_DRAIN_S = 1.0
POLL_S = 0.05


class Drain:
    """Whether a worker is draining. Mutates: its own flag only (set once, from any thread)."""

    def __init__(self) -> None:
        self._set = threading.Event()

    @property
    def draining(self) -> bool:
        return self._set.is_set()

    def begin(self) -> None:
        self._set.set()

    def check(self, who: str) -> None:
        """Raise the refusal a service gives a new request while draining (`who`: "decode group d0")."""
        if self.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"{who} {DRAINING}")


def idle(loop: EngineHandle) -> bool:
    """No request running, waiting or reserved (awaiting KV) on the engine, by its last published stats."""
    s = loop.stats
    return s.running == 0 and s.waiting == 0 and s.remote == 0


def drain_in_background(name: str, drain: Drain, loop: EngineHandle, done: Callable[[], None]) -> threading.Thread:
    """Start draining and, on a thread, wait until the engine is idle (after MIN_DRAIN_S), then call `done`
    (stop the worker, exit)."""
    drain.begin()
    log.warning("worker %s is draining: no new work; it exits once its requests are done", name)

    def wait() -> None:
        time.sleep(MIN_DRAIN_S)
        while not (idle(loop) or loop.error):
            time.sleep(POLL_S)
        log.warning("worker %s drained: exiting", name)
        done()

    t = threading.Thread(target=wait, name=f"kvrelay-{name}-drain", daemon=True)
    t.start()
    return t


def exit_actor_soon() -> None:
    """Ask this Ray actor to exit on its own task queue (its `exit` method calls `ray.actor.exit_actor()`): an
    intended exit, never restarted. Callable from any thread of the actor."""
    import ray

    ray.get_runtime_context().current_actor.exit.remote()


class DrainingActor:
    """What both worker actors share once a drain has finished: stop the worker and leave as an intended exit.
    A subclass sets `drained` in its constructor and has `stop()`."""

    drained: bool

    def stop(self) -> None:
        raise NotImplementedError

    def _drained(self) -> None:
        self.drained = True
        self.stop()
        exit_actor_soon()

    def exit(self) -> None:
        """An intended exit (Ray does not restart the actor)."""
        import ray

        ray.actor.exit_actor()


def on_sigterm(handler: Callable[[], None]) -> bool:
    """Call `handler` on SIGTERM (from the main thread only, where Python runs signal handlers); False when
    this is not the main thread (the caller then relies on its drain call)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, lambda signum, frame: handler())
    return True
