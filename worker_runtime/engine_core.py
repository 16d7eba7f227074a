"""`EngineCoreClient`: the `EngineHandle` of an engine that runs in a process of its own, the engine core
(`worker_runtime.engine_core_proc`), so that a worker's gRPC service and KV receivers no longer share a GIL with
its engine steps.

The child is a fresh interpreter (spawned, never forked: threads, CUDA). Commands go to it over one ZeroMQ
socket; its replies and per-step outputs come back in order over another (`engine_core_wire`), read by one thread
here, which also watches the child's sentinel: the moment the child exits (a crash, SIGKILL, the OOM killer) the
handle's `error` says how, every subscribed request ends with an "abort" output carrying it, and later calls raise
`EngineDead`, as when an in-process engine loop dies. A request's sink is registered here before its start command
is sent, so no output of it can arrive unseen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from engine.config import EngineConfig
from engine.engine_loop import OPERATIONS, EngineDead, EngineLoop, EngineStats, run_sinks
from engine.outputs import RequestOutput
from worker_runtime import engine_core_wire as wire
from worker_runtime.engine_core_proc import BEAT_S, CoreSpec, build_engine
from worker_runtime.handle import EngineHandle

log = logging.getLogger("kvrelay.engine_core")
Sink = Callable[[RequestOutput], None]
SILENT_S = 20 * BEAT_S  # a live core that has sent nothing this long is stuck whole (counts as stuck_for)


def start_engine(name: str, config: EngineConfig, init_method: str | None = None,
                 device: str | None = None) -> EngineHandle:
    """A worker's engine behind its handle: in an engine core process (RuntimeConfig.engine_process, the
    default; KVRELAY_ENGINE_PROCESS=0 turns it off), else an engine loop on a thread of this process."""
    if config.runtime.resolved(config.device).engine_process:
        return EngineCoreClient(name, config, init_method, device)
    return EngineLoop(build_engine(config, init_method, device), name)


class EngineCoreClient:
    """Mutates: its child process, its sockets and its subscriptions. Construction blocks until the child has
    built its engine (for several ranks: until every follower joined `init_method`); an engine that cannot be
    built raises its exception here, with the child's traceback as a note."""

    def __init__(self, name: str, config: EngineConfig, init_method: str | None = None,
                 device: str | None = None) -> None:
        self.name = name
        self.error: str | None = None
        self._lock = threading.Lock()  # guards the subscriptions, pending calls and the command socket
        self._sinks: dict[str, Sink] = {}
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._aio: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._dir = tempfile.mkdtemp(prefix="kvrelay-core-")
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PUSH)
        self._events = self._zmq.socket(zmq.PULL)
        for sock, hwm in ((self._commands, zmq.SNDHWM), (self._events, zmq.RCVHWM)):
            sock.setsockopt(hwm, 0)
            sock.setsockopt(zmq.LINGER, 0)
        self._commands.bind(f"ipc://{self._dir}/commands")
        self._events.bind(f"ipc://{self._dir}/events")
        spec = CoreSpec(name, config, f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events", init_method,
                        device)
        with open(f"{self._dir}/spec.pkl", "wb") as f:
            pickle.dump(spec, f)
        self.process = _spawn(f"{self._dir}/spec.pkl")
        self._sentinel = os.pidfd_open(self.process.pid)  # readable the moment the child exits
        self._poller = zmq.Poller()
        self._poller.register(self._events, zmq.POLLIN)
        self._poller.register(self._sentinel, zmq.POLLIN)
        self._config, self.stats = self._await_ready()
        self._stuck, self._heard_at = 0.0, time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"kvrelay-{name}-core-client", daemon=True)
        self._thread.start()

    # ---- EngineHandle -------------------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self._config

    def call(self, op: str, *args: Any) -> concurrent.futures.Future:
        """Run engine operation `op` (a name in OPERATIONS) in the core before its next step."""
        if not isinstance(op, str) or op not in OPERATIONS:
            raise ValueError(f"{op!r} is not an engine operation (one of {sorted(OPERATIONS)}); functions of the "
                             f"engine cannot cross to the engine core process")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.error is not None or self._stopping:
                fut.set_exception(EngineDead(self.error or "engine stopped"))
                return fut
            call_id = next(self._ids)
            try:
                self._commands.send(wire.pack_command("call", call_id, op, args), zmq.NOBLOCK)
            except zmq.Again:  # the child has gone (its end of the socket closed); the watcher says how
                fut.set_exception(EngineDead(f"the engine core process of {self.name} is not reachable"))
                return fut
            self._pending[call_id] = fut
        return fut

    async def acall(self, op: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self.call(op, *args))

    async def astart(self, request_id: str, sink: Sink, op: str, *args: Any) -> Any:
        """As `EngineLoop.astart`: subscribed before the start is sent, dropped if it fails; a cancelled start
        is aborted (a no-op if it never started)."""
        with self._lock:
            self._sinks[request_id] = sink
        try:
            return await self.acall(op, *args)
        except asyncio.CancelledError:
            self.unsubscribe(request_id)
            self.call("abort_request", request_id)
            raise
        except BaseException:
            self.unsubscribe(request_id)
            raise

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)

    def deliver_on(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        """Run sinks on this asyncio loop: one `call_soon_threadsafe` per engine step for all requests."""
        self._aio = aio_loop

    def stuck_for(self) -> float:
        """Seconds the core's loop has been inside one step or call, as its last heartbeat said and counting;
        or, if the core has gone silent (hung whole), how long it has been."""
        now = time.monotonic()
        silent = now - self._heard_at
        if silent > SILENT_S:
            return silent
        return self._stuck + silent if self._stuck > 0 else 0.0

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the core down (its engine, and so its tensor-parallel followers, leave), killing it past
        `timeout_s`. Subscribed requests end with "the worker is shutting down"."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            try:
                self._commands.send(wire.pack_command("stop", timeout_s), zmq.NOBLOCK)
            except zmq.Again:
                pass
        try:
            self.process.wait(timeout_s + 5)
        except subprocess.TimeoutExpired:
            log.warning("engine core of %s did not stop within %.0f s: killed", self.name, timeout_s)
            self.process.kill()
            self.process.wait(5)
        self._thread.join(5)
        self._cleanup()

    # ---- the client thread --------------------------------------------------------------------------------
    def _await_ready(self) -> tuple[EngineConfig, EngineStats]:
        while True:
            ready = dict(self._poller.poll(1000))
            if self._events in ready:
                event = wire.decode_event(self._events.recv())
                if isinstance(event, wire.Ready):
                    return pickle.loads(event.config), event.stats
                if isinstance(event, wire.Failed):
                    self.process.wait(10)
                    self._cleanup()
                    error = pickle.loads(event.error)
                    error.add_note(f"in the engine core process of {self.name}:\n{event.traceback}")
                    raise error
            elif self._sentinel in ready:
                self.process.wait()
                self._cleanup()
                raise RuntimeError(f"the engine core process of {self.name} {_exit(self.process.returncode)} "
                                   f"before its engine was built (its stderr says why)")

    def _cleanup(self) -> None:
        self._zmq.destroy(linger=0)
        os.close(self._sentinel)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _run(self) -> None:
        while True:
            ready = dict(self._poller.poll(1000))
            if self._events in ready:
                self._drain()
            if self._sentinel in ready:
                self._drain()  # what it sent before it went
                self.process.wait()
                if self._stopping:
                    self._end("the worker is shutting down", dead=False)
                else:
                    self._end(f"engine core process {_exit(self.process.returncode)}", dead=True)
                return

    def _drain(self) -> None:
        while True:
            try:
                data = self._events.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard_at = time.monotonic()
            self._handle(wire.decode_event(data))

    def _handle(self, event: wire.Event) -> None:
        if isinstance(event, wire.Step):
            pairs = []
            with self._lock:
                for out in event.outputs:
                    sink = self._sinks.pop(out.request_id, None) if out.finished else \
                        self._sinks.get(out.request_id)
                    if sink is not None:
                        pairs.append((sink, out))
            self.stats = event.stats
            self._deliver(pairs)
        elif isinstance(event, wire.Reply):
            with self._lock:
                fut = self._pending.pop(event.call_id, None)
            # A call whose awaiting task was cancelled (its client went away) has a cancelled future: the reply
            # has nobody to go to (a cancelled start is aborted by its caller).
            if fut is not None and fut.set_running_or_notify_cancel():
                value = pickle.loads(event.value)
                fut.set_result(value) if event.ok else fut.set_exception(value)
        elif isinstance(event, wire.Beat):
            self._stuck = event.stuck_s
        elif isinstance(event, wire.Dead):
            self._end(event.error, dead=True)

    def _end(self, error: str, dead: bool) -> None:
        """End every subscribed request with an "abort" output carrying `error` and fail every pending call;
        `dead`: the engine is gone, so `error` is the handle's."""
        with self._lock:
            if dead and self.error is None:
                self.error = error
                log.error("engine of %s: %s", self.name, error)
            sinks, self._sinks = self._sinks, {}
            pending, self._pending = self._pending, {}
        self._deliver([(sink, RequestOutput(rid, [], finished=True, finish_reason="abort", error=error))
                       for rid, sink in sinks.items()])
        for fut in pending.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDead(error))

    def _deliver(self, pairs: list[tuple[Sink, RequestOutput]]) -> None:
        if not pairs:
            return
        if self._aio is None:
            run_sinks(pairs)
            return
        try:
            self._aio.call_soon_threadsafe(run_sinks, pairs)
        except RuntimeError:  # its loop is closed: the service has stopped, nobody reads these
            pass


def _spawn(spec_path: str) -> subprocess.Popen:
    """A fresh interpreter (never a fork: this process has threads, maybe CUDA) that imports the core alone, not
    this process's __main__ (as multiprocessing's spawn would: a script, pytest, Ray's worker). It sees this
    process's import path, environment (KVRELAY_*, CUDA_VISIBLE_DEVICES), stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    return subprocess.Popen([sys.executable, "-c", "from worker_runtime.engine_core_proc import main; main()",
                             spec_path], env=env, stdin=subprocess.DEVNULL, close_fds=True)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"exited with signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"

