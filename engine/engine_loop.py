"""Runs an `LLMEngine` on a thread of its own, so that a server (asyncio, gRPC) can feed it and read its outputs.

Only the loop thread touches the engine: other threads submit calls (`call`), which run between steps, and
subscribe a sink per request, which the loop calls with each `RequestOutput` of that request. The loop steps
while there is work and otherwise sleeps until a call arrives. If a step fails, the engine is unusable (e.g. a
tensor-parallel rank died): every subscribed request ends with an "abort" output carrying the error, and later
calls raise `EngineDead`. So does a call that fails in torch.distributed (a rank is gone). Every
`KEEPALIVE_S` the loop calls the engine's keepalive between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch.distributed import DistError

from engine.config import EngineConfig
from engine.executor import WorkerError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

T = TypeVar("T")
log = logging.getLogger("kvrelay.engine_loop")

# With only remote prefills pending (KV in flight, nothing to compute), poll for landed KV this often.
REMOTE_POLL_S = 0.002
# Between steps this often, the engine's keepalive: idle tensor-parallel ranks and KV channels must never sit
# in a receive long enough to time out.
KEEPALIVE_S = 30.0


class EngineDead(RuntimeError):
    """The engine loop stopped after a failed step; the message carries why."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the loop publishes after every step (read lock-free by other threads)."""

    num_blocks: int
    free_blocks: int
    running: int
    waiting: int
    remote: int
    prefix_cache_hit_rate: float
    steps: int
    num_preemptions: int = 0  # since the engine started


# What other threads (and, through `worker_runtime.engine_core`, other processes) may ask of the engine by name:
# the operations a worker service needs. Named, not callables, so the same calls cross a process boundary.
OPERATIONS = frozenset({"add_request", "reserve_remote_prefill", "set_first_token", "abort_request",
                        "call_extension"})


StepHook = Callable[[list[RequestOutput], EngineStats], None]
# Reads calls that arrive from outside the process into the loop (`EngineLoop.call`), on the loop thread: waits
# at most the given seconds for one when there is nothing else to do, and returns at once when given 0.
Inbox = Callable[["EngineLoop", float], None]
# An inbox wait is cut this short, so that a stop from this process's own threads is seen soon.
INBOX_WAIT_S = 0.05


class EngineLoop:
    """`on_step`, if given, gets every step's whole output list and the stats after it, on the loop thread (the
    engine core process forwards both in one message); `on_death` gets the error when the loop dies. `inbox`, if
    given, is how calls from another process arrive: the loop thread itself reads them between steps (and waits
    on it when idle), so a busy engine never hands the GIL to a reader thread per call."""

    def __init__(self, engine: LLMEngine, name: str = "engine", on_step: StepHook | None = None,
                 on_death: Callable[[str], None] | None = None, inbox: Inbox | None = None) -> None:
        self.engine = engine
        self._on_step, self._on_death, self._inbox = on_step, on_death, inbox
        engine.defer_expects = True  # reservations between two steps: one registration call for all of them
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], concurrent.futures.Future]] = \
            queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.error: str | None = None
        self.busy_since: float | None = None  # when the running step or call began
        self._steps = 0
        self.stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name=f"kvrelay-{name}-loop", daemon=True)
        self._thread.start()

    # ---- used from other threads --------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def call(self, op: str | Callable[[LLMEngine], T], *args: Any) -> concurrent.futures.Future[T]:
        """Run engine operation `op` (a name in OPERATIONS, called with `args`; or, in-process only, a function
        of the engine) on the loop thread before its next step; the future holds its value or exception."""
        fn = _operation(op, args)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self.error is not None:
            fut.set_exception(EngineDead(self.error))
            return fut
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    async def acall(self, op: str | Callable[[LLMEngine], T], *args: Any) -> T:
        return await asyncio.wrap_future(self.call(op, *args))

    async def astart(self, request_id: str, sink: Callable[[RequestOutput], None], op: str, *args: Any) -> Any:
        """Run `op(*args)`, which starts request `request_id` (adds or reserves it), and in the same call
        subscribe `sink` to its outputs, so none is missed: on the asyncio loop given to `deliver_on` (one
        hand-over per step for all requests), else on the loop thread (then it must be quick and thread-safe);
        the sink is dropped after the finished output, or by `unsubscribe`. If the awaiting task is cancelled
        (the client went away), the call may still have run, so the request is aborted (a no-op if it never
        started) and no blocks stay held."""
        fn = _operation(op, args)

        def start(eng: LLMEngine) -> Any:
            value = fn(eng)
            self._sinks[request_id] = sink
            return value

        try:
            return await self.acall(start)
        except asyncio.CancelledError:
            self.call("abort_request", request_id)
            raise

    def unsubscribe(self, request_id: str) -> None:
        """Deliver no more of the request's outputs (e.g. a start that reserved nothing)."""
        self._sinks.pop(request_id, None)

    def deliver_on(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        """Run sinks on this asyncio loop: a step's outputs cross threads in one `call_soon_threadsafe`, not one
        per request (each is a wake-up of the loop)."""
        self._aio = aio_loop

    def _deliver(self, pairs: list[tuple[Callable[[RequestOutput], None], RequestOutput]]) -> None:
        if pairs:
            if self._aio is not None:
                self._aio.call_soon_threadsafe(run_sinks, pairs)
            else:
                run_sinks(pairs)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop stepping and shut the engine down (its tensor-parallel ranks too)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        self.engine.shutdown()

    # ---- the loop thread ----------------------------------------------------------------------------------
    def _snapshot(self) -> EngineStats:
        s = self.engine.scheduler
        return EngineStats(self.engine.num_blocks, self.engine.num_free_blocks, len(s.running), len(s.waiting),
                           len(s.remote), self.engine.prefix_cache_hit_rate, self._steps, s.num_preemptions)

    def _run_calls(self) -> None:
        """Run every queued call, then register the reservations they made on the ranks in one batched call,
        and only then answer them: a reservation's caller may tell the prefill side to send at once."""
        eng = self.engine
        answers: list[tuple[concurrent.futures.Future, Any, list[str]]] = []
        try:
            while True:
                try:
                    fn, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                if not fut.set_running_or_notify_cancel():
                    continue
                self.busy_since = time.monotonic()
                queued = len(eng._expects)
                try:
                    value = fn(eng)
                    answers.append((fut, value, [e[0] for e in eng._expects[queued:]]))
                except BaseException as e:  # the caller gets it; the loop carries on, unless the ranks are gone
                    fut.set_exception(e)
                    if isinstance(e, (DistError, WorkerError)):
                        raise
                finally:
                    self.busy_since = None
            failed = eng.flush_expects() if eng._expects else {}
        except BaseException as e:
            for fut, _, _ in answers:
                fut.set_exception(e)
            raise
        for fut, value, rids in answers:
            error = next((failed[r] for r in rids if r in failed), None)
            if error is None:
                fut.set_result(value)
                continue
            for r in rids:
                self._sinks.pop(r, None)
            fut.set_exception(RuntimeError(f"could not register the transfer on every rank: {error}"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        pairs = []
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                pairs.append((sink, out))
        self._deliver(pairs)

    def _run(self) -> None:
        eng = self.engine
        last_keepalive = time.monotonic()
        while not self._stopping:
            try:
                if self._inbox is not None:
                    self._inbox(self, 0.0)
                self._run_calls()
                if time.monotonic() - last_keepalive > KEEPALIVE_S:
                    eng.keepalive()
                    last_keepalive = time.monotonic()
                if not eng.has_unfinished_requests():
                    self._wait(KEEPALIVE_S)
                    continue
                self.busy_since = time.monotonic()
                outputs = eng.step()
                self.busy_since = None
            except BaseException:
                self._die(traceback.format_exc())
                break
            self._steps += 1
            self._dispatch(outputs)
            self.stats = self._snapshot()
            if self._on_step is not None:
                self._on_step(outputs, self.stats)
            s = eng.scheduler
            if not (s.running or s.waiting) and not outputs:
                # Only KV transfers in flight: nothing to compute, so wait for a call or the next poll.
                self._wait(REMOTE_POLL_S)
        while not self._stopping:  # dead: fail every call that still arrives, until stopped
            self._fail_calls()
            self._wait(KEEPALIVE_S)
        self._end_all("the worker is shutting down")
        self._fail_calls()

    def _wait(self, timeout_s: float) -> None:
        """Until a call arrives (from this process or through the inbox), at most `timeout_s`."""
        if self._inbox is None:
            self._wake.wait(timeout_s)
        elif not self._wake.is_set():
            self._inbox(self, min(timeout_s, INBOX_WAIT_S))
        self._wake.clear()

    def stuck_for(self) -> float:
        """Seconds the current step or call has run (0 when between them): a worker whose loop is stuck in a
        collective (a rank hung) reports itself unhealthy past a bound."""
        since = self.busy_since
        return time.monotonic() - since if since is not None else 0.0

    def _die(self, tb: str) -> None:
        self.error = f"engine failed:\n{tb}"
        log.error(self.error)
        self._end_all(self.error)
        if self._on_death is not None:
            self._on_death(self.error)

    def _end_all(self, error: str) -> None:
        """End every subscribed request with an "abort" output carrying `error`."""
        self._deliver([(sink, RequestOutput(rid, [], finished=True, finish_reason="abort", error=error))
                       for rid, sink in self._sinks.items()])
        self._sinks.clear()

    def _fail_calls(self) -> None:
        while True:
            try:
                _, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDead(self.error or "engine stopped"))


def _operation(op: str | Callable[[LLMEngine], T], args: tuple) -> Callable[[LLMEngine], T]:
    if callable(op):
        return op
    if op not in OPERATIONS:
        raise ValueError(f"{op!r} is not an engine operation (one of {sorted(OPERATIONS)})")
    return lambda eng: getattr(eng, op)(*args)


def run_sinks(pairs: list[tuple[Callable[[RequestOutput], None], RequestOutput]]) -> None:
    for sink, out in pairs:
        try:
            sink(out)
        except Exception:
            log.exception("output sink of request %s failed", out.request_id)
