"""Per-step attention metadata, handed to the attention layers through a context manager.

The runner builds one `AttentionMetadata` per step (from the scheduler output) and enters `attention_context`
around the model's forward; each `Attention` layer reads it with `get_attention_metadata()`. So the model's
forward signature stays `forward(input_ids, positions)` and model code never sees scheduling.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Describes a flat batch of `num_tokens` tokens from `num_seqs` sequences.

    Sequence b contributes tokens [query_start[b], query_start[b+1]) of the batch; after this step it has
    `seq_lens[b]` tokens of KV, the new ones at its last positions.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    query_start: list[int]  # host copy, length num_seqs + 1
    seq_lens_host: list[int]  # host copy, length num_seqs
    seq_lens: torch.Tensor  # [num_seqs] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    query_positions: torch.Tensor  # [num_seqs, max_query_len] int64 absolute positions; padding -> 0
    query_pad_index: torch.Tensor  # [num_tokens] int64: flat token -> b * max_query_len + i
    max_query_len: int
    all_fresh_prefill: bool  # every sequence starts at position 0 (no cached KV is read)
    # Pure decode on CUDA: one token per sequence, K/V written and read by the Triton kernels. Then only
    # slot_mapping (-1 = padding row), seq_lens (0 = padding row) and block_tables are used: all of them device
    # tensors of a fixed shape, so the step can be replayed as a CUDA graph.
    paged_decode: bool = False
    # Called after layer i has written this step's KV: kv_transfer sends layer i while layer i+1 computes.
    on_layer_kv_written: Callable[[int], None] | None = None
    # Memo of masks per sliding window, built on first use by a layer and shared by the rest.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # A mixed step (decode rows next to prompts or prompt chunks): (token indices [t] int64 into the batch, their
    # metadata) per part; each part attends on its own (the decode rows as a pure decode step would, with the
    # Triton kernel on CUDA), after the whole batch's KV was stored with `slot_mapping`. None: one part.
    parts: list[tuple[torch.Tensor, AttentionMetadata]] | None = None


    @classmethod
    def for_decode(cls, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor) -> AttentionMetadata:
        """Metadata of a pure-decode step for the Triton kernels (no host copies: they would be stale in a graph)."""
        empty = slot_mapping.new_empty(0)
        return cls(slot_mapping=slot_mapping, query_start=[], seq_lens_host=[], seq_lens=seq_lens,
                   block_tables=block_tables, query_positions=empty, query_pad_index=empty, max_query_len=1,
                   all_fresh_prefill=False, paged_decode=True)


# Per thread: several engines may step at once in one process (e.g. two engine loops), each on its own thread.
_LOCAL = threading.local()


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    prev = getattr(_LOCAL, "meta", None)
    _LOCAL.meta = meta
    try:
        yield meta
    finally:
        _LOCAL.meta = prev


def get_attention_metadata() -> AttentionMetadata:
    meta = getattr(_LOCAL, "meta", None)
    if meta is None:
        raise RuntimeError("attention layers run only inside attention_context(...) (set by the model runner)")
    return meta
