"""CUDA graphs of the model's decode forward and LM head, one per batch-size bucket.

Eager decode is bound by the host launching ~40 small kernels per layer; a graph replays them in one launch. Each
bucket's graph reads fixed device buffers (token ids, positions, slots, KV lengths, block tables) that `run` fills
before replaying, and writes the rows' float32 logits into a fixed output (the LM head inside the graph: at small
batch its launches and its weight read are a tenth of the step). Attention metadata for a graph is the Triton
path's (`AttentionMetadata.for_decode`), whose launch shapes depend only on the bucket size.

Captured once, after the KV cache exists (the graphs hold pointers into it), largest bucket first so the smaller ones
reuse its memory pool. The graphs call no per-layer hook: the runner replays them only for steps that need none.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.input_batch import LENGTH, POSITION, SLOT, TOKEN
from engine.layers.attention_context import AttentionMetadata, attention_context

SMALL_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def bucket_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: SMALL_BUCKETS, then steps of 64, up to and including max_batch."""
    sizes = [b for b in SMALL_BUCKETS if b < max_batch]
    b = SMALL_BUCKETS[-1] + 64
    while b < max_batch:
        sizes.append(b)
        b += 64
    return sizes + [max_batch]


class DecodeGraphs:
    """Mutates: its static input buffers on every `run` (the replay reads them)."""

    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.model = model
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = max_batch
        m = self.buckets[-1]
        self.packed = torch.zeros(4, m, dtype=torch.int64, device=device)  # rows as StepInputs.packed (first 4)
        self.packed[SLOT].fill_(-1)
        self.tables = torch.zeros(m, max_blocks_per_seq, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, vocab] float32 logits, written by its graph

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket. The static inputs are padding here (no KV written, nothing attended)."""
        pool = None
        for bs in reversed(self.buckets):
            p = self.packed[:, :bs]
            meta = AttentionMetadata.for_decode(p[SLOT], p[LENGTH], self.tables[:bs])
            with attention_context(meta):
                # warm-up: Triton compiles, cuBLAS picks its kernels
                self.model.compute_logits(self.model(p[TOKEN], p[POSITION]))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model.compute_logits(self.model(p[TOKEN], p[POSITION]))
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def static_inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers the graph of `bucket` rows reads, for the runner to fill in place: packed [4, bucket] (rows
        TOKEN, POSITION, SLOT, LENGTH of StepInputs.packed; padding rows slot -1, length 0) and tables [bucket, max
        blocks per sequence]."""
        return self.packed[:, :bucket], self.tables[:bucket]

    def replay(self, bucket: int, num_seqs: int) -> torch.Tensor:
        """Replay the graph of `bucket` rows on its filled static inputs; returns logits [num_seqs, vocab] float32."""
        self.graphs[bucket].replay()
        return self.outputs[bucket][:num_seqs]
