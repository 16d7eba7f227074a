"""The engine core process: what a worker's spawned child runs (`main`). It builds the worker's `LLMEngine`
(for a decode group of several ranks, rank 0's TPWorker joining the group), runs the engine loop on a thread, and
serves the commands of its service process (`worker_runtime.engine_core.EngineCoreClient`) over ZeroMQ, sending
back one message per engine step (`worker_runtime.engine_core_wire`).

It imports the engine and ZeroMQ only (no gRPC, no Ray), and leaves at once if its parent does: no orphan may hold
a GPU or a port. It ignores SIGINT (Ctrl-C reaches the whole process group; its parent stops it).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import zmq

from engine.config import EngineConfig
from worker_runtime import engine_core_wire as wire

log = logging.getLogger("kvrelay.engine_core")

BEAT_S = 0.25  # how often the core says it lives (and whether its loop is stuck)
PARENT_POLL_S = 0.2  # how often it checks that its parent lives


@dataclass(frozen=True)
class CoreSpec:
    """What the child needs to build its engine: the worker's config (device chosen), and for a group of several
    ranks the rendezvous its followers join (it builds rank 0)."""

    name: str
    config: EngineConfig
    commands: str  # ZeroMQ address the service pushes commands to (bound by the parent)
    events: str  # ZeroMQ address the core pushes events to (bound by the parent)
    init_method: str | None = None
    device: str | None = None


def main() -> None:
    """The child's entry point: `python -c "...main()" SPEC_PATH` (a pickled CoreSpec)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(sys.argv[1], "rb") as f:
        spec = pickle.load(f)
    run_core(spec)


def run_core(spec: CoreSpec) -> None:
    """Serve `spec`'s engine until stopped. Leaves with os._exit: a gloo teardown racing a closed channel could
    abort the interpreter's exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _leave_with_parent(os.getppid())
    ctx = zmq.Context()
    events = ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a step's outputs
    events.setsockopt(zmq.LINGER, 2000)
    events.connect(spec.events)
    commands = ctx.socket(zmq.PULL)
    commands.setsockopt(zmq.RCVHWM, 0)
    commands.connect(spec.commands)
    send_lock = threading.Lock()  # the loop thread (replies, steps, a death) and the beat thread send

    def send(data: bytes) -> None:
        with send_lock:
            events.send(data)

    stop = _Stop()
    try:
        loop = _build(spec, send, _inbox(commands, send, stop))
    except BaseException as e:
        send(wire.encode(wire.Failed(wire.pickle_value(e, True), traceback.format_exc())))
        events.close()  # lingers until the message is out
        os._exit(1)
    send(wire.encode(wire.Ready(pickle.dumps(loop.config), loop.stats)))
    threading.Thread(target=_beat, args=(loop, send), name="kvrelay-core-beat", daemon=True).start()
    try:
        stop.wait()  # the inbox, on the loop thread, sets it when the service says stop
        loop.stop(stop.timeout_s)
    finally:
        events.close()
        os._exit(0)


class _Stop(threading.Event):
    timeout_s = 30.0


def build_engine(config: EngineConfig, init_method: str | None = None, device: str | None = None):  # -> LLMEngine
    """A worker's engine; for tensor_parallel_size > 1 as rank 0 of the group that forms at `init_method`
    (blocks until every follower has joined). In the core process, or in the service's own (engine_process
    off)."""
    from engine.executor import Executor, GroupLeaderExecutor  # torch: only once the child can report errors
    from engine.llm_engine import LLMEngine
    from engine.worker import TPWorker

    executor: Executor | None = None
    if config.parallel.tensor_parallel_size > 1:
        if init_method is None:
            raise ValueError("a group of several ranks needs the init_method its followers join")
        executor = GroupLeaderExecutor(TPWorker(config, 0, init_method, device))
    return LLMEngine(config, executor)


def _build(spec: CoreSpec, send, inbox):  # -> EngineLoop
    from engine.engine_loop import EngineLoop

    def on_step(outputs, stats) -> None:
        try:
            send(wire.encode(wire.Step(outputs, stats)))
        except Exception:  # never the engine's problem; the client would see the stream stall
            log.exception("engine core %s could not send a step's outputs", spec.name)

    return EngineLoop(build_engine(spec.config, spec.init_method, spec.device), spec.name, on_step=on_step,
                      on_death=lambda error: send(wire.encode(wire.Dead(error))), inbox=inbox)


def _inbox(commands: zmq.Socket, send, stop: _Stop):
    """The engine loop's inbox (engine.engine_loop.Inbox): on the loop thread, between steps, every command
    that has arrived becomes a call (its reply goes out when it completes, on the loop thread, before the next
    step's outputs); idle, it waits on the socket. No reader thread: one would need the GIL from the busy loop
    thread for every command (up to a switch interval, 5 ms, each)."""

    def inbox(loop, timeout_s: float) -> None:
        if timeout_s > 0 and not commands.poll(timeout_s * 1000):
            return
        while not stop.is_set():
            try:
                command = wire.unpack_command(commands.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if command[0] == "stop":
                stop.timeout_s = command[1]
                stop.set()  # the main thread stops the loop (a thread cannot join itself)
                return
            _, call_id, op, args = command

            def answer(fut, call_id=call_id) -> None:
                e = fut.exception()
                send(wire.reply(call_id, e is None, fut.result() if e is None else e))

            try:
                loop.call(op, *args).add_done_callback(answer)
            except Exception as e:  # not an operation
                send(wire.reply(call_id, False, e))

    return inbox


def _beat(loop, send) -> None:
    while True:
        send(wire.encode(wire.Beat(loop.stuck_for())))
        time.sleep(BEAT_S)


def _leave_with_parent(parent: int) -> None:
    """Kill this process as soon as its parent is gone (re-parented). Polled, not PR_SET_PDEATHSIG: that fires
    when the parent *thread* that started the child exits, which may be any thread of a worker."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kvrelay-core-parent", daemon=True).start()
