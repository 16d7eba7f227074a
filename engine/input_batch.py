"""The runner's persistent batch: per-slot block tables, sampling parameters and last sampled tokens, kept across
steps and updated from each `SchedulerOutput`'s diff; and the step inputs built from it with array ops.

Host state is numpy (the scheduler's slots index it); device state mirrors it and is updated with non-blocking
copies from pinned memory, so preparing a step never synchronises the host. Each step costs one host-to-device
copy of its packed inputs (plus one for new block-table entries and one for new requests' parameters when there
are any), whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.sampler import SamplingBatch
from engine.scheduler_output import SchedulerOutput

# Rows of StepInputs.packed
TOKEN, POSITION, SLOT, LENGTH, BATCH_SLOT = range(5)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without blocking the host: through pinned memory, whose caching allocator keeps
    each buffer until its copy has run, so the next step may prepare its inputs while this one is queued."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class StepInputs:
    """One step's inputs on the device, and what the host keeps of them."""

    num_rows: int
    # [5, padded tokens] int64 by row TOKEN (-1: read the slot's last sampled token on the device), POSITION,
    # SLOT (KV cache slot; -1 = padding), LENGTH (KV length of the token's sequence after this step; 0 = padding)
    # and BATCH_SLOT (persistent-batch row of the token's request).
    packed: torch.Tensor
    input_ids: torch.Tensor  # [padded tokens] int64, placeholders resolved on the device
    query_start: np.ndarray  # [num_rows + 1] host: row b's tokens are [query_start[b], query_start[b + 1])
    sample_rows: np.ndarray  # rows whose chunk reaches their sequence's last token, ascending
    sample_slots: torch.Tensor  # [len(sample_rows)] int64 device: their persistent-batch rows
    sampling: SamplingBatch | None  # None when no row samples


class PersistentBatch:
    """Mutates: its host arrays and device tensors, from `apply` and the runner's `record_sampled`."""

    def __init__(self, num_slots: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.device, self.block_size = device, block_size
        self.tables_np = np.zeros((num_slots, max_blocks), dtype=np.int64)  # [slots, max blocks per sequence]
        # On CPU the "device" table is the host array itself; on CUDA a mirror updated by `apply`.
        self.tables = (torch.zeros(num_slots, max_blocks, dtype=torch.int64, device=device)
                       if device.type == "cuda" else torch.from_numpy(self.tables_np))
        self.temperature = np.zeros(num_slots, dtype=np.float32)  # 0 = greedy
        self.top_k = np.zeros(num_slots, dtype=np.int64)
        self.top_p = np.ones(num_slots, dtype=np.float32)
        self.noise_seed = np.zeros(num_slots, dtype=np.int64)
        self.logprobs = np.full(num_slots, -1, dtype=np.int64)  # -1 = not asked
        self.float_params = torch.zeros(2, num_slots, dtype=torch.float32, device=device)  # temperature, top_p
        self.int_params = torch.zeros(2, num_slots, dtype=torch.int64, device=device)  # top_k, noise seed
        self.last_tokens = torch.zeros(num_slots, dtype=torch.int64, device=device)  # sampled by the last step

    def apply(self, out: SchedulerOutput) -> None:
        """Take the step's diff: new requests' parameters and block-table entries appended since last seen."""
        if out.new_requests:
            for r in out.new_requests:
                p, s = r.params, r.slot
                self.temperature[s] = 0.0 if p.greedy else p.temperature
                self.top_k[s] = p.effective_top_k
                self.top_p[s] = p.top_p
                self.noise_seed[s] = r.noise_seed
                self.logprobs[s] = -1 if p.logprobs is None else p.logprobs
            self.float_params.copy_(to_device(np.stack([self.temperature, self.top_p]), self.device),
                                    non_blocking=True)
            self.int_params.copy_(to_device(np.stack([self.top_k, self.noise_seed]), self.device), non_blocking=True)
        if out.new_blocks:
            rows, cols, ids = [], [], []
            for slot, first, blocks in out.new_blocks:
                self.tables_np[slot, first:first + len(blocks)] = blocks
                rows.append(np.full(len(blocks), slot, dtype=np.int64))
                cols.append(np.arange(first, first + len(blocks), dtype=np.int64))
                ids.extend(blocks)
            if self.device.type == "cuda":
                diff = to_device(np.stack([np.concatenate(rows), np.concatenate(cols), np.array(ids, np.int64)]),
                                 self.device)
                self.tables.index_put_((diff[0], diff[1]), diff[2])

    def prepare(self, out: SchedulerOutput, padded_tokens: int, ids_out: torch.Tensor | None = None) -> StepInputs:
        """Flat inputs of the step's tokens, padded to `padded_tokens` (a CUDA-graph bucket, or the token count);
        the input ids are written into `ids_out` when given (a graph's static buffer)."""
        bs = self.block_size
        slots = np.asarray(out.slots, dtype=np.int64)
        starts = np.asarray(out.starts, dtype=np.int64)
        counts = np.asarray(out.num_tokens, dtype=np.int64)
        n_rows, n_tok = len(slots), len(out.token_ids)
        query_start = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        if n_tok == n_rows:  # pure decode: token b is row b
            row = np.arange(n_rows)
            positions = starts
        else:
            row = np.repeat(np.arange(n_rows), counts)
            positions = starts[row] + np.arange(n_tok) - query_start[row]
        token_slots = slots[row]
        packed = np.zeros((5, padded_tokens), dtype=np.int64)
        packed[TOKEN, :n_tok] = out.token_ids
        packed[POSITION, :n_tok] = positions
        packed[SLOT, :n_tok] = self.tables_np[token_slots, positions // bs] * bs + positions % bs
        packed[SLOT, n_tok:] = -1
        packed[LENGTH, :n_tok] = (starts + counts)[row]
        packed[BATCH_SLOT, :n_tok] = token_slots
        index = np.asarray(out.output_index, dtype=np.int64)
        sample_rows = np.flatnonzero(index >= 0)
        sel = slots[sample_rows]
        # One copy for the step: the packed token rows, then the sampling rows' slots and output indices.
        dev = to_device(np.concatenate([packed.ravel(), sel, index[sample_rows]]), self.device)
        packed_dev = dev[:5 * padded_tokens].view(5, padded_tokens)
        tail = dev[5 * padded_tokens:]
        sample_slots, sample_index = tail[:len(sel)], tail[len(sel):]
        tok = packed_dev[TOKEN]
        last = self.last_tokens[packed_dev[BATCH_SLOT]]
        input_ids = torch.where(tok >= 0, tok, last) if ids_out is None else \
            torch.where(tok >= 0, tok, last, out=ids_out)
        sampling = None
        if len(sel):
            lp = int(self.logprobs[sel].max())
            sampling = SamplingBatch(all_greedy=not self.temperature[sel].any(), max_logprobs=None if lp < 0 else lp)
            if not sampling.all_greedy:
                sampling.slots, sampling.output_index = sample_slots, sample_index
                sampling.float_params, sampling.int_params = self.float_params, self.int_params
        return StepInputs(n_rows, packed_dev, input_ids, query_start, sample_rows, sample_slots, sampling)

    def record_sampled(self, sample_slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """The step's sampled tokens become their slots' inputs for the next step (read on the device)."""
        self.last_tokens.index_copy_(0, sample_slots, token_ids)
