"""`--processes N`: one run's load sent by N worker processes, their records merged into one run.

One Python process drives a few hundred streams with a whole core, and past that it measures itself. Workers are
fresh interpreters (the "spawn" context: never a fork of a parent that may hold gRPC channels and their threads).
Each opens its own client, warms up its share, says it is ready and waits for the parent's go, which carries one
common start time t0 (perf_counter is the system-wide monotonic clock, so one t0 serves every process). From t0 it
runs the ordinary runner over its share of the load (shares.py) and sends its RunResult back, pickled. The merged
run is what one process would have recorded: every worker's records by index, and the duration from t0 to the last
worker's last response. A worker that fails or dies stops the run with an error naming it and its exception; Ctrl-C
(which the workers ignore) makes the parent stop them all.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from bench.load.config import BenchConfig, LoadConfig
from bench.load.connect import MODEL_INFO_TIMEOUT_S, open_client
from bench.load.progress import Progress
from bench.load.records import RequestRecord
from bench.load.runner import RunOptions, RunResult, run_load
from bench.load.shares import worker_loads
from bench.load.workloads import Workload

START_LEAD_S = 0.05  # t0 lies this far past the go, so every worker is awake and waits for the same instant
POLL_S = 0.05  # how often the parent looks for messages, dead workers and progress (outside any measurement)
STOP_S = 5.0  # how long a stopped worker has to exit before it is killed


class WorkerError(RuntimeError):
    """A worker process failed or died: the message names it and what happened."""


async def drive(cfg: BenchConfig, client: Any, workload: Workload, load: LoadConfig, opts: RunOptions) -> RunResult:
    """One run of `load`: in this process on `client`, or over `load.processes` worker processes."""
    if load.processes == 1:
        return await run_load(client, workload, load, cfg.sampling, opts)
    return await run_processes(cfg, workload, load, opts)


@dataclass
class _Worker:
    index: int
    proc: BaseProcess
    conn: Connection  # the parent's end: the worker sends ("ready", None), then ("done", RunResult), or ("error", s)


async def run_processes(cfg: BenchConfig, workload: Workload, load: LoadConfig, opts: RunOptions) -> RunResult:
    """Run `load` over `load.processes` spawned workers (each its own client to `cfg`'s endpoint) as one run."""
    ctx = mp.get_context("spawn")
    go, t0 = ctx.Event(), ctx.Value("d", 0.0)
    counts = ctx.Array("q", 2)  # finished and failed measured requests of all workers, for the progress bar
    workers: list[_Worker] = []
    if opts.progress:
        print(f"kvrelay bench: starting {load.processes} load processes", file=sys.stderr, flush=True)
    try:
        for w, (wload, share) in enumerate(worker_loads(load)):
            mine, theirs = ctx.Pipe(duplex=False)
            wopts = replace(opts, share=share, progress=False)
            proc = ctx.Process(target=_worker_main, args=(cfg, workload, wload, wopts, theirs, go, t0, counts),
                               name=f"kvrelay-bench-{w}", daemon=True)
            proc.start()
            theirs.close()  # the worker holds the only writing end: its death reads as EOF here
            workers.append(_Worker(w, proc, mine))
        await _collect(workers, "ready")  # connected and warmed up, every one
        t0.value = time.perf_counter() + START_LEAD_S
        go.set()
        progress = Progress(opts.label, load.num_requests, load.duration, enabled=opts.progress)
        runs: list[RunResult] = await _collect(workers, "done", lambda: progress.set(counts[0], counts[1]))
        progress.set(counts[0], counts[1])
        progress.close()
    finally:
        _stop(workers)
    return RunResult(records=sorted((r for run in runs for r in run.records), key=lambda r: r.index),
                     duration_s=max(run.duration_s for run in runs),
                     warmup=sorted((r for run in runs for r in run.warmup), key=lambda r: r.index))


async def _collect(workers: list[_Worker], kind: str, tick: Callable[[], None] | None = None) -> list[Any]:
    """Every worker's next message, which must be `kind`, in worker order; WorkerError for one that failed or died.
    Polls, so the event loop stays free to take a Ctrl-C."""
    got: dict[int, Any] = {}
    n = len(workers)
    while len(got) < n:
        for w in workers:
            if w.index in got:
                continue
            if w.conn.poll():
                try:
                    what, body = w.conn.recv()
                except EOFError:
                    raise _died(w, n, kind) from None
                if what == "error":
                    raise WorkerError(f"load worker {w.index} of {n} failed: {body}")
                assert what == kind, (what, kind)
                got[w.index] = body
            elif not w.proc.is_alive() and not w.conn.poll():  # it may have sent its message as it exited
                raise _died(w, n, kind)
        if tick is not None:
            tick()
        if len(got) < n:
            await asyncio.sleep(POLL_S)
    return [got[w.index] for w in workers]


def _died(w: _Worker, n: int, kind: str) -> WorkerError:
    w.proc.join(STOP_S)
    code = w.proc.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
    return WorkerError(f"load worker {w.index} of {n} {how} before it was {kind} (its stderr may say why)")


def _stop(workers: list[_Worker]) -> None:
    """Every worker gone: those done are exiting anyway; the others are terminated, then killed if they linger."""
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()
    for w in workers:
        w.proc.join(STOP_S)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()


class _Counts:
    """A worker's progress sink: its finished (and failed) requests added to the counters the parent's bar shows."""

    def __init__(self, counts: Any) -> None:
        self.counts = counts

    def update(self, rec: RequestRecord) -> None:
        with self.counts.get_lock():
            self.counts[0] += 1
            self.counts[1] += not rec.ok

    def close(self) -> None:
        pass


def _worker_main(cfg: BenchConfig, workload: Workload, load: LoadConfig, opts: RunOptions, conn: Connection,
                 go: Any, t0: Any, counts: Any) -> None:
    """A worker process's entry point (importable by name, as "spawn" needs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    try:
        run = asyncio.run(_worker(cfg, workload, load, opts, conn, go, t0, counts))
    except BaseException as e:  # every failure goes to the parent, which names this worker
        conn.send(("error", _describe(e)))
        raise SystemExit(1) from None
    conn.send(("done", run))
    conn.close()


async def _worker(cfg: BenchConfig, workload: Workload, load: LoadConfig, opts: RunOptions, conn: Connection,
                  go: Any, t0: Any, counts: Any) -> RunResult:
    async with open_client(cfg) as client:
        # Connected (and an OpenAI server's model resolved) before the start, as the single process is.
        await client.model_info(timeout=cfg.timeout or MODEL_INFO_TIMEOUT_S)

        async def start() -> float:  # after the warm-up: ready, then the common start
            conn.send(("ready", None))
            parent = mp.parent_process()
            while not await asyncio.to_thread(go.wait, POLL_S):
                if parent is not None and not parent.is_alive():
                    raise RuntimeError("the parent process is gone")
            start_s = float(t0.value)
            await asyncio.sleep(max(0.0, start_s - time.perf_counter()))
            return start_s

        return await run_load(client, workload, load, cfg.sampling, opts, start=start, progress=_Counts(counts))


def _describe(e: BaseException) -> str:
    """`Type: message (at file:line in function)`, for the parent's error: the innermost frame of this project's
    code, not of the libraries it called."""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if not f.filename.startswith((sys.prefix, sys.base_prefix))] or tb
    where = f" (at {ours[-1].filename}:{ours[-1].lineno} in {ours[-1].name})" if ours else ""
    return f"{type(e).__name__}: {e}{where}"
