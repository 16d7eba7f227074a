"""Host-side inputs of a pure-decode step (every scheduled sequence computes exactly one new token).

Built in one pass over the scheduled sequences into two CPU tensors, so a step costs two host-to-device copies
whatever the batch size. Rows past `num_seqs` pad the batch up to a CUDA-graph bucket: they write no KV (slot -1),
attend over nothing (length 0) and their outputs are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.scheduler import ScheduledSeq

# Rows of DecodeInputs.packed
TOKEN, POSITION, SLOT, LENGTH = range(4)


@dataclass
class DecodeInputs:
    num_seqs: int
    # [4, padded] int64: token id, position, cache slot (block * block_size + offset; -1 = padding row) and KV
    # length after this step (position + 1; 0 = padding row), by row TOKEN, POSITION, SLOT, LENGTH.
    packed: torch.Tensor
    # [padded, width] int64: each sequence's block table, width = its longest table; 0 past a table's end
    block_tables: torch.Tensor

    @property
    def padded(self) -> int:
        return self.packed.shape[1]


def is_pure_decode(seqs: Sequence[ScheduledSeq]) -> bool:
    return bool(seqs) and all(len(s.token_ids) == 1 for s in seqs)


def prepare_decode(seqs: Sequence[ScheduledSeq], block_size: int, padded: int) -> DecodeInputs:
    """`seqs` must be a pure-decode batch (see `is_pure_decode`) of at most `padded` sequences."""
    n = len(seqs)
    pad = padded - n
    if pad < 0:
        raise ValueError(f"{n} sequences do not fit {padded} rows")
    ids, pos, slots = [], [], []
    for s in seqs:
        p = s.start
        ids.append(s.token_ids[0])
        pos.append(p)
        slots.append(s.block_table[p // block_size] * block_size + p % block_size)
    lens = [p + 1 for p in pos]
    packed = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad, lens + [0] * pad],
                          dtype=torch.int64)
    width = max(len(s.block_table) for s in seqs)
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs] + [[0] * width] * pad
    return DecodeInputs(n, packed, torch.tensor(tables, dtype=torch.int64))
