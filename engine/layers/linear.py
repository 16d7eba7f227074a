"""Megatron-style tensor-parallel linear layers.

Column-parallel layers split the output features over ranks and need no communication; row-parallel layers
split the input features and all-reduce their partial sums (the only collective here). Each parameter carries a
`weight_loader(param, src, shard_id)` that reads just this rank's shard of a checkpoint tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp
from engine.layers.fused_ops import one_row_kernels
from engine.layers.weight_utils import copy_into, expect_shape, read_shard


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) must be divisible by the tensor-parallel size ({b})")
    return a // b


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.load_weight  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.load_weight  # type: ignore[attr-defined]
        else:
            self.bias = None

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (no bias): a batch-1 decode row through the Triton one-row kernel where it beats cuBLAS."""
        if (k := one_row_kernels(x)) is not None and k.prefers_skinny(*self.weight.shape):
            return k.skinny_linear(x, self.weight)
        return F.linear(x, self.weight)


class ColumnParallelLinear(_Linear):
    """y[:, shard] = x @ W[shard].T (+ b[shard]); output stays split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.full_out = out_features
        super().__init__(in_features, divide(out_features, tp.size, "output features"), bias)

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        n = param.shape[0]
        expect_shape(src, (self.full_out, *param.shape[1:]), "column-parallel weight")
        copy_into(param, read_shard(src, 0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        return self.matmul(x)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        full = self.out_sizes[shard_id]
        n = full // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        expect_shape(src, (full, *param.shape[1:]), f"merged projection part {shard_id}")
        copy_into(param.narrow(0, offset, n), read_shard(src, 0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections split by heads. Output per rank: [q heads | k heads | v heads].

    With fewer KV heads than ranks, each KV head is replicated on tp_size / num_kv_heads consecutive ranks.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = get_tp()
        if num_kv_heads >= tp.size:
            divide(num_kv_heads, tp.size, "num_key_value_heads")
        else:
            divide(tp.size, num_kv_heads, "tensor-parallel size over num_key_value_heads")
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.total_kv_heads = num_kv_heads
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        _Linear.__init__(self, hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias)
        self.tp_rank, self.tp_size = tp.rank, tp.size

    def kv_head_start(self) -> int:
        """Index of this rank's first KV head in the full model."""
        if self.total_kv_heads >= self.tp_size:
            return self.tp_rank * self.num_kv_heads
        return self.tp_rank // (self.tp_size // self.total_kv_heads)

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        expect_shape(src, (self.full_sizes[shard_id], *param.shape[1:]), f"{shard_id}_proj")
        if shard_id == "q":
            offset, start, n = 0, self.tp_rank * q, q
        else:
            offset = q if shard_id == "k" else q + kv
            start, n = self.kv_head_start() * d, kv
        copy_into(param.narrow(0, offset, n), read_shard(src, 0, start, n))


class RowParallelLinear(_Linear):
    """y = all_reduce(x[:, shard] @ W[:, shard].T) + b; input arrives split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp()
        self.tp_rank, self.tp_size, self.group = tp.rank, tp.size, tp.group
        self.full_in = in_features
        super().__init__(divide(in_features, tp.size, "input features"), out_features, bias)

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias is not split; added once after the reduction
            expect_shape(src, tuple(param.shape), "row-parallel bias")
            copy_into(param, read_shard(src, 0, 0, param.shape[0]))
            return
        n = param.shape[1]
        expect_shape(src, (param.shape[0], self.full_in), "row-parallel weight")
        copy_into(param, read_shard(src, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.tp_size > 1:
            dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias
        return y
