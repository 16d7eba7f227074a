"""Vocab-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp
from engine.layers.fused_ops import one_row_kernels
from engine.layers.weight_utils import copy_into, expect_shape, read_shard


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * per_rank, (rank + 1) * per_rank) of the embedding (the vocab padded to a multiple of tp)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        tp = get_tp()
        self.tp_rank, self.tp_size, self.group = tp.rank, tp.size, tp.group
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim), requires_grad=False)
        self.weight.weight_loader = self.load_weight  # type: ignore[attr-defined]

    def load_weight(self, param: nn.Parameter, src: Any, shard_id: Any = None) -> None:
        expect_shape(src, (self.vocab_size, param.shape[1]), "vocab-parallel weight")
        n = self.end - self.start
        copy_into(param.narrow(0, 0, n), read_shard(src, 0, self.start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, dim]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(mine, input_ids - self.start, 0)
        y = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y, group=self.group)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden @ W.T, computed per vocab slice and gathered to the full vocabulary on every rank."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_seqs, dim] -> logits [num_seqs, vocab_size]
        if (k := one_row_kernels(hidden)) is not None and k.prefers_skinny(*self.weight.shape):
            logits = k.skinny_linear(hidden, self.weight)  # batch-1 decode
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits, group=self.group)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.vocab_size]
