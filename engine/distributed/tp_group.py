"""Joining a tensor-parallel group, and the group's host-side control collectives.

Each rank is its own process; the torch.distributed world of that process *is* its TP group (a TP group is
packed on one node and lives and dies together). On GPU the model's collectives run over NCCL and control
messages (the step to run, the agreed KV block count) over a separate gloo group, so they never touch the GPU.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import TensorParallelState, set_tensor_parallel

CONTROL_TIMEOUT_S = 30 * 24 * 3600.0


class TPGroup:
    """This rank's membership in its tensor-parallel group. Mutates: the process's torch.distributed world."""

    def __init__(self, rank: int, size: int, init_method: str, use_cuda: bool, timeout_s: float = 600.0) -> None:
        self.rank, self.size = rank, size
        timeout = datetime.timedelta(seconds=timeout_s)
        # Ranks > 0 wait in the control broadcast for as long as rank 0 has nothing to run: that wait must not
        # time out (a dead peer still shows at once: gloo sees its connection close). The NCCL group keeps the
        # short timeout: it only ever waits inside a step.
        control = datetime.timedelta(seconds=CONTROL_TIMEOUT_S)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=size, timeout=timeout if use_cuda else control)
        self.device_group = dist.group.WORLD
        self.cpu_group = dist.new_group(backend="gloo", timeout=control) if use_cuda else dist.group.WORLD
        set_tensor_parallel(TensorParallelState(rank, size, self.device_group))

    def broadcast_from_rank0(self, obj: Any) -> Any:
        """Rank 0 passes `obj`; every rank returns rank 0's object (pickled over gloo)."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gather_to_rank0(self, obj: Any) -> list[Any] | None:
        """Rank 0 returns every rank's `obj` in rank order; other ranks return None."""
        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def min_across_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
