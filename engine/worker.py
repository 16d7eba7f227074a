"""One tensor-parallel rank as a process: load this rank's shard, then run every step rank 0 hands it.

Rank 0 receives steps from its driver (an `Executor` over a pipe, or a decode worker in-process) and broadcasts
each to the other ranks, so all ranks enter the same forward pass and its collectives together.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from engine.distributed.tp_group import TPGroup
from engine.runner import ModelRunner, StepResult
from engine.worker_extension import RankContext, load_extension


def rank_device(device: str, rank: int) -> str:
    """Rank r of a GPU group on "cuda:K" (or "cuda", K = 0) uses cuda:K+r; on CPU every rank uses the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    base = int(device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


class TPWorker:
    """`device` overrides the rank's device (e.g. "cuda:0" in a process that sees only its own GPU)."""

    def __init__(self, config: Any, rank: int, init_method: str, device: str | None = None) -> None:
        size = config.parallel.tensor_parallel_size
        self.device = device or rank_device(config.device, rank)
        if self.device == "cpu":  # share the cores between the ranks rather than oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        else:
            torch.cuda.set_device(self.device)
        self.group = TPGroup(rank, size, init_method, use_cuda=self.device != "cpu")
        self.runner = ModelRunner(config.model, config.cache, config.scheduler, self.device, config.load_format,
                                  config.runtime)
        self.num_blocks = self.runner.allocate_kv_cache(self.group.min_across_ranks(self.runner.local_num_blocks()))
        self.extension = make_extension(config, self.runner, rank)

    def step(self, msg: Any) -> Any:
        """Run one broadcast message on every rank: a SchedulerOutput (rank 0 gets the StepResult with every
        rank's extension events) or ("ext", method, args) (rank 0 gets every rank's return value).
        None means shut down."""
        msg = self.group.broadcast_from_rank0(msg)
        if msg is None:
            return None
        if isinstance(msg, tuple) and msg[0] == "ext":
            # An extension error is a result, not a crash: every rank still joins the gather, the group lives.
            try:
                value: Any = getattr(self.extension, msg[1])(*msg[2])
            except Exception as e:
                value = ExtensionError(f"rank {self.group.rank}: {type(e).__name__}: {e}")
            return ("ext", self.group.gather_to_rank0(value))
        if isinstance(msg, tuple) and msg[0] == "keepalive":
            # Between steps, now and then: the broadcast itself tells idle ranks rank 0 is alive; the extension
            # (KV connector) keeps its own idle channels alive.
            if self.extension is not None and hasattr(self.extension, "keepalive"):
                self.extension.keepalive()
            return ("ext", self.group.gather_to_rank0(None))
        result: StepResult = self.runner.execute(msg, self.extension).result()
        events = self.group.gather_to_rank0(result.ext_events[0] if result.ext_events else None)
        result.ext_events = events if self.extension is not None and events is not None else []
        return result


class ExtensionError(RuntimeError):
    """A worker-extension call failed on a rank (the rank itself keeps running)."""


def make_extension(config: Any, runner: ModelRunner, rank: int) -> Any:
    if not getattr(config, "worker_extension", None):
        return None
    ctx = RankContext(rank, config.parallel.tensor_parallel_size, runner.device, runner.kv_cache,
                      config.model, config.cache)
    return load_extension(config.worker_extension, ctx)


def run_follower(worker: TPWorker) -> None:
    """A rank > 0 whose rank 0 lives in another process: take part in every step until rank 0 shuts down. If
    this rank fails, its process exits at once, so that rank 0's next collective fails fast instead of waiting
    for a rank that will never come."""
    try:
        while worker.step(None) is not None:
            pass
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if worker.extension is not None and hasattr(worker.extension, "close"):
        worker.extension.close()
    worker.group.destroy()


def worker_main(config: Any, rank: int, init_method: str, conn: Any) -> None:
    """Process entry point. Rank 0 talks to the driver through `conn`: ("ready", num_blocks) once, then a
    StepResult (or ("error", text)) for each SchedulerOutput received; None received = shut down."""
    try:
        worker = TPWorker(config, rank, init_method)
    except Exception:
        if conn is not None:
            conn.send(("error", traceback.format_exc()))
        raise
    if rank == 0:
        conn.send(("ready", worker.num_blocks))
    while True:
        msg = conn.recv() if rank == 0 else None
        try:
            result = worker.step(msg)
        except Exception:
            if rank == 0:
                conn.send(("error", traceback.format_exc()))
            raise
        if result is None:
            break
        if rank == 0:
            conn.send(result)
    worker.group.destroy()
