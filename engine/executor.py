"""Executors run a `SchedulerOutput` on the model's rank(s) and return rank 0's `StepResult`.

`submit` queues a step and returns a handle whose `result()` waits for it, so the engine can schedule the next
step meanwhile (async scheduling); handles are collected in submission order. `LocalExecutor` holds the runner in
this process (tensor_parallel_size 1): a step runs on the GPU while the host goes on. `MultiprocExecutor` spawns
one process per rank (`engine.worker`) and talks to rank 0 over a pipe, so even on CPU a step runs while the
driver schedules the next; the driving process keeps only the scheduler, so its own torch.distributed state
stays untouched. `GroupLeaderExecutor` (rank 0 of a group whose ranks were started elsewhere) runs each step to
its end in `submit`: its ranks join collectives after every step.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections import deque
from typing import Any, Protocol

from engine.runner import ModelRunner, StepResult
from engine.scheduler import SchedulerOutput
from engine.worker import ExtensionError, TPWorker, make_extension, worker_main


class StepHandle(Protocol):
    def result(self) -> StepResult: ...


class _Done:
    def __init__(self, result: StepResult) -> None:
        self._result = result

    def result(self) -> StepResult:
        return self._result


class Executor:
    num_blocks: int

    def submit(self, out: SchedulerOutput) -> StepHandle:
        raise NotImplementedError

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.submit(out).result()

    def call_extension(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every rank's worker extension; the return values in rank order."""
        raise NotImplementedError

    def keepalive(self) -> None:
        """Between steps, every so often: tell idle ranks and the extension's idle channels that all is well."""

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    def __init__(self, config: Any) -> None:
        self.runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.load_format,
                                  config.runtime)
        self.num_blocks = self.runner.allocate_kv_cache()
        self.extension = make_extension(config, self.runner, 0)

    def submit(self, out: SchedulerOutput) -> StepHandle:
        return self.runner.execute(out, self.extension)

    def call_extension(self, method: str, *args: Any) -> list[Any]:
        if self.extension is None:
            raise RuntimeError("this engine has no worker_extension configured")
        return [getattr(self.extension, method)(*args)]

    def keepalive(self) -> None:
        if self.extension is not None and hasattr(self.extension, "keepalive"):
            self.extension.keepalive()

    def shutdown(self) -> None:
        if self.extension is not None and hasattr(self.extension, "close"):
            self.extension.close()


def _checked(method: str, results: list[Any]) -> list[Any]:
    """Every rank's return value, or one error naming each rank's failure."""
    errors = [r for r in results if isinstance(r, ExtensionError)]
    if errors:
        raise ExtensionError(f"worker extension {method!r} failed: " + "; ".join(map(str, errors)))
    return results


class GroupLeaderExecutor(Executor):
    """This process is rank 0 of a tensor-parallel group whose other ranks run in processes started elsewhere
    (a decode worker's Ray actors, each in `engine.worker.run_follower`). Rank 0 broadcasts every step itself."""

    def __init__(self, worker: TPWorker) -> None:
        if worker.group.rank != 0:
            raise ValueError("GroupLeaderExecutor runs on rank 0 only")
        self.worker = worker
        self.num_blocks = worker.num_blocks
        self._closed = False

    def submit(self, out: SchedulerOutput) -> StepHandle:
        return _Done(self.worker.step(out))

    def call_extension(self, method: str, *args: Any) -> list[Any]:
        return _checked(method, self.worker.step(("ext", method, args))[1])

    def keepalive(self) -> None:
        self.worker.step(("keepalive",))

    def shutdown(self) -> None:
        """Tell the other ranks to stop (they leave `run_follower`) and leave the group."""
        if self._closed:
            return
        self._closed = True
        self.worker.step(None)
        ext = self.worker.extension
        if ext is not None and hasattr(ext, "close"):
            ext.close()
        self.worker.group.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed; the message carries its traceback."""


class _Reply:
    """Rank 0's answer to a step sent down the pipe. Answers come back in the order messages were sent, so an
    extension call made while steps are in flight first takes their answers off the pipe and keeps them here."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self._executor = executor
        self._value: StepResult | None = None

    def result(self) -> StepResult:
        while self._value is None:
            self._executor._pump()
        return self._value


class MultiprocExecutor(Executor):
    def __init__(self, config: Any, startup_timeout_s: float = 600.0) -> None:
        self._closed, self.procs = False, []
        self._replies: deque[_Reply] = deque()
        size = config.parallel.tensor_parallel_size
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.conn, child = ctx.Pipe()
        self.procs = [
            ctx.Process(target=worker_main, args=(config, r, init_method, child if r == 0 else None), daemon=True,
                        name=f"kvrelay-tp{r}")
            for r in range(size)
        ]
        for p in self.procs:
            p.start()
        child.close()  # only rank 0 holds the other end now: its death reads as EOF here
        try:
            _, self.num_blocks = self._recv(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _recv(self, timeout_s: float | None = None) -> Any:
        waited = 0.0
        while not self.conn.poll(1.0):
            waited += 1.0
            dead = [p.name for p in self.procs if not p.is_alive()]
            if dead:
                raise WorkerError(f"tensor-parallel worker(s) {dead} exited")
            if timeout_s is not None and waited >= timeout_s:
                raise WorkerError(f"tensor-parallel workers did not answer within {timeout_s:.0f} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            codes = {p.name: p.exitcode for p in self.procs}
            raise WorkerError(f"tensor-parallel rank 0 exited (exit codes {codes})") from None
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise WorkerError(f"tensor-parallel rank 0 failed:\n{msg[1]}")
        return msg

    def submit(self, out: SchedulerOutput) -> StepHandle:
        self.conn.send(out)
        reply = _Reply(self)
        self._replies.append(reply)
        return reply

    def _pump(self) -> None:
        """Receive the oldest outstanding step's answer into its handle."""
        self._replies.popleft()._value = self._recv()

    def _call(self, msg: Any) -> Any:
        self.conn.send(msg)
        while self._replies:
            self._pump()
        return self._recv()

    def call_extension(self, method: str, *args: Any) -> list[Any]:
        return _checked(method, self._call(("ext", method, args))[1])

    def keepalive(self) -> None:
        self._call(("keepalive",))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.procs[0].is_alive():
                self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
