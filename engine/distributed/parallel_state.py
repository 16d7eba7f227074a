"""Which tensor-parallel rank this process is, and its process group.

Set once per process before the model is built (`set_tensor_parallel`); layers read it at construction to pick
their shard and at run time to find the group for their collective. A single-process engine keeps the default
(rank 0 of 1, no group) and never calls into torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} out of range for size {self.size}")


_STATE = TensorParallelState()


def set_tensor_parallel(state: TensorParallelState) -> None:
    global _STATE
    _STATE = state


def get_tp() -> TensorParallelState:
    return _STATE
