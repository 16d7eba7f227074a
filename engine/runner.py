"""Model runner: owns the model, the KV tensors and the persistent batch; turns a `SchedulerOutput` into one
forward pass and samples.

It is the only place that touches both scheduling data and tensors. Per step it applies the scheduler's diff to
the persistent batch, builds the flat inputs (one host-to-device copy), runs the model inside the attention
context, computes logits only for rows that sample, samples on every rank (identical logits and counter-based
noise give identical tokens, so each rank feeds its own next step) and, on rank 0, starts one non-blocking copy
of the tokens (and logprobs) to the host. `execute` returns at once with a `PendingStep`; its `result()` waits
for that copy: the step's one host synchronisation, which async scheduling defers until the next step is queued.

On CUDA, pure-decode steps (one new token per sequence) take a fast path: the Triton paged-attention kernels,
replayed as a CUDA graph of the padded batch when the step needs no per-layer hook. A mixed step's decode rows
replay that graph too, its prompts run eagerly apart (`engine.mixed_steps`). `RuntimeConfig` switches them
(enforce_eager disables the graphs, decode_kernel=False the Triton decode path and with it the graphs). CPU and
prefill steps always run the portable torch path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import mixed_steps
from engine.config import CacheConfig, ModelConfig, RuntimeConfig, SchedulerConfig
from engine.cuda_graphs import DecodeGraphs
from engine.distributed.parallel_state import get_tp
from engine.input_batch import BATCH_SLOT, LENGTH, POSITION, SLOT, TOKEN, PersistentBatch, StepInputs, to_device
from engine.layers import fused_ops
from engine.layers.attention import Attention
from engine.layers.attention_context import AttentionMetadata, attention_context
from engine.models.loader import TORCH_DTYPES, load_model
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import SLOTS_PER_SEAT
from engine.scheduler_output import SchedulerOutput

CPU_DEFAULT_KV_BYTES = 1 << 30  # with no budget given on CPU: 1 GiB of KV
MAX_GRAPH_BATCH = 512  # larger decode batches run the Triton path eagerly (launch overhead is small next to them)


@dataclass
class StepResult:
    """Tokens sampled by one step, for its sampling rows in row order (rank 0; other ranks get an empty list)."""

    token_ids: list[int]
    # request id -> (logprob of the sampled token, [(token id, logprob)] top-n), for requests that asked.
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    # What each rank's worker extension returned from end_step, in rank order (empty without an extension).
    ext_events: list[Any] = field(default_factory=list)


class PendingStep:
    """A step queued on the device; `result()` waits for its tokens (an event, not a device-wide sync)."""

    def __init__(self, out: SchedulerOutput, inputs: StepInputs, so: SamplerOutput | None, rank0: bool,
                 ext_events: list[Any], logprobs_asked: np.ndarray | None = None) -> None:
        """`logprobs_asked`: logprobs=n of each sampling row (-1: not asked)."""
        self.ext_events = ext_events
        self._out, self._rows, self._asked = out, inputs.sample_rows, logprobs_asked
        self._host: list[torch.Tensor] = []
        self._event = None
        self._lp = so is not None and so.sampled_logprobs is not None
        if so is None or not rank0:
            return
        parts = [so.token_ids]
        if self._lp:
            parts += [so.sampled_logprobs, *([so.top_token_ids, so.top_logprobs] if so.top_logprobs is not None
                                             else [])]
        cuda = so.token_ids.is_cuda
        for t in parts:
            if cuda:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                self._host.append(h)
            else:
                self._host.append(t)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        if not self._host:
            return StepResult([], {}, self.ext_events)
        tokens = self._host[0].tolist()
        result = StepResult(tokens, {}, self.ext_events)
        if self._lp:
            lp = self._host[1].tolist()
            top_ids = self._host[2].tolist() if len(self._host) > 2 else None
            top_lp = self._host[3].tolist() if len(self._host) > 2 else None
            for i, b in enumerate(self._rows.tolist()):
                n = int(self._asked[i])
                if n >= 0:
                    top = list(zip(top_ids[i][:n], top_lp[i][:n])) if top_ids and n else []
                    result.logprobs[self._out.request_ids[b]] = (lp[i], top)
        return result


class ModelRunner:
    def __init__(self, model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, device: str = "cpu",
                 load_format: str = "auto", runtime: RuntimeConfig | None = None) -> None:
        self.model_config, self.cache_config, self.sched_config = model, cache, sched
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" means the current device; pin it so memory queries work
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.runtime = (runtime or RuntimeConfig()).resolved(str(self.device))
        fused_ops.set_enabled(self.runtime.fused_ops)
        self.dtype = TORCH_DTYPES[model.dtype]
        self.block_size = cache.block_size
        self.model = load_model(model, self.device, max_positions=sched.max_model_len, load_format=load_format)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.max_blocks_per_seq = -(-sched.max_model_len // self.block_size)
        self.batch = PersistentBatch(sched.max_num_seqs * SLOTS_PER_SEAT, self.max_blocks_per_seq, self.block_size,
                                     self.device)
        self.num_blocks = 0  # set by allocate_kv_cache (tensor-parallel ranks first agree on the count)
        cuda = self.device.type == "cuda"
        self.decode_kernel = cuda and self.runtime.decode_kernel
        # Graphs with TP > 1 would capture NCCL all-reduces; not yet verified on several GPUs, so TP ranks run eager.
        self.use_graphs = self.decode_kernel and not self.runtime.enforce_eager and get_tp().size == 1
        self.graphs: DecodeGraphs | None = None  # captured by allocate_kv_cache

    def allocate_kv_cache(self, num_blocks: int | None = None) -> int:
        """Allocate `num_blocks` blocks (default: what this rank's budget allows); returns the count."""
        self.num_blocks = num_blocks if num_blocks is not None else self.local_num_blocks()
        a = self.attn_layers[0]
        # [2, layers, num_blocks, block_size, kv_heads, head_dim]: one allocation, per-layer views bound below.
        self.kv_cache = torch.zeros(2, len(self.attn_layers), self.num_blocks, self.block_size, a.num_kv_heads,
                                    a.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        if self.use_graphs:
            self.graphs = DecodeGraphs(self.model, min(self.sched_config.max_num_seqs, MAX_GRAPH_BATCH),
                                       self.max_blocks_per_seq, self.device)
            self.graphs.capture()
        return self.num_blocks

    # ---- KV memory ----------------------------------------------------------------------------------------
    @property
    def kv_block_bytes(self) -> int:
        """Bytes one block takes on this rank over all layers (K and V, this rank's KV heads)."""
        a = self.attn_layers[0]
        return 2 * len(self.attn_layers) * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def local_num_blocks(self) -> int:
        """How many blocks this rank's KV budget holds."""
        c = self.cache_config
        if c.num_blocks is not None:
            return c.num_blocks
        budget = c.memory_bytes
        if budget is None:
            budget = self._gpu_kv_budget() if self.device.type == "cuda" else CPU_DEFAULT_KV_BYTES
        blocks = budget // self.kv_block_bytes
        if blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes is less than one block ({self.kv_block_bytes} bytes)")
        return int(blocks)

    def _gpu_kv_budget(self) -> int:
        """This engine may use gpu_memory_utilization of the card: that minus its weights and a reserve for
        one step's activations is KV, clamped to what is actually free (other processes or engines)."""
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        m, sc = self.model_config, self.sched_config
        # Activations of one step: a few [tokens, max(hidden, 2 * intermediate)] buffers, logits of every
        # sequence in float32 (and their sort for top-k/top-p), plus 1 GiB for the allocator and workspaces.
        reserve = (1 << 30) + 8 * sc.max_num_batched_tokens * max(m.hidden_size, 2 * m.intermediate_size) * 4 \
            + 4 * sc.max_num_seqs * m.vocab_size * 4 + self.cache_config.reserve_bytes
        budget = min(int(total * self.cache_config.gpu_memory_utilization) - weights, free) - reserve
        if budget < self.kv_block_bytes:
            raise ValueError(
                f"not enough GPU memory for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"weights take {weights / 2**30:.1f} GiB; raise gpu_memory_utilization or set kv_cache_memory"
            )
        return budget

    # ---- one step -----------------------------------------------------------------------------------------
    def _torch_metadata(self, out: SchedulerOutput, inp: StepInputs) -> AttentionMetadata:
        """Metadata of the portable torch path (prefill, mixed and CPU steps). A mixed step's decode rows (one
        new token after cached ones) attend apart from its prompts and chunks: with the Triton decode kernel
        where there is one, never padded to the longest prompt chunk; the rest as a step of their own."""
        starts = np.asarray(out.starts, dtype=np.int64)
        qs = inp.query_start
        counts = np.diff(qs)
        decode = mixed_steps.decode_mask(starts, counts)
        if decode.all() or not decode.any():
            slots = inp.packed[BATCH_SLOT][to_device(qs[:-1].copy(), self.device)]  # [n] rows' batch slots
            return self.rows_metadata(inp.packed[SLOT], starts, counts, slots)
        dec, rest = np.flatnonzero(decode), np.flatnonzero(~decode)
        rest_tokens, rest_starts = mixed_steps.row_tokens(qs, rest)
        tokens = to_device(np.concatenate([qs[dec], rest_tokens, starts[dec] + 1]), self.device)
        dec_tokens, rest_tokens_d = tokens[:len(dec)], tokens[len(dec):len(dec) + len(rest_tokens)]
        row_tokens = tokens[:len(dec) + len(rest_tokens)]
        slots = inp.packed[BATCH_SLOT][row_tokens]  # [t] each token's batch slot (decode rows first)
        if self.decode_kernel:
            width = -(-int(starts[dec].max() + 1) // self.block_size)
            dec_meta = AttentionMetadata.for_decode(inp.packed[SLOT][dec_tokens], tokens[len(row_tokens):],
                                                    self.batch.tables[slots[:len(dec)], :width])
        else:
            dec_meta = self.rows_metadata(inp.packed[SLOT][dec_tokens], starts[dec], counts[dec], slots[:len(dec)])
        rest_meta = self.rows_metadata(inp.packed[SLOT][rest_tokens_d], starts[rest], counts[rest],
                                        slots[len(dec):][to_device(rest_starts, self.device)])
        empty = inp.packed[SLOT].new_empty(0)
        return AttentionMetadata(slot_mapping=inp.packed[SLOT], query_start=[], seq_lens_host=[], seq_lens=empty,
                                 block_tables=empty, query_positions=empty, query_pad_index=empty,
                                 max_query_len=int(counts.max()), all_fresh_prefill=False,
                                 parts=[(dec_tokens, dec_meta), (rest_tokens_d, rest_meta)])

    def rows_metadata(self, slot_mapping: torch.Tensor, starts: np.ndarray, counts: np.ndarray,
                       slots: torch.Tensor) -> AttentionMetadata:
        """Torch-path metadata of rows whose tokens are `slot_mapping`'s, in order: row b starts at position
        starts[b] with counts[b] new tokens; `slots`: [rows] their batch slots (on the device)."""
        seq_lens = starts + counts
        query_start = np.concatenate([[0], np.cumsum(counts)])
        n, max_q = len(starts), int(counts.max())
        qpos = starts[:, None] + np.arange(max_q)[None, :]
        qpos[np.arange(max_q)[None, :] >= counts[:, None]] = 0
        row = np.repeat(np.arange(n), counts)
        pad_index = row * max_q + np.arange(len(row)) - query_start[row]
        width = -(-int(seq_lens.max()) // self.block_size)
        dev = to_device(np.concatenate([seq_lens, qpos.ravel(), pad_index]), self.device)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start=query_start.tolist(),
            seq_lens_host=seq_lens.tolist(),
            seq_lens=dev[:n],
            block_tables=self.batch.tables[slots, :width],
            query_positions=dev[n:n + n * max_q].view(n, max_q),
            query_pad_index=dev[n + n * max_q:],
            max_query_len=max_q,
            all_fresh_prefill=not starts.any(),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, extension: Any = None) -> PendingStep:
        """Queue one step; `extension` (a worker extension) sees the step's start, each layer's KV, its end."""
        self.batch.apply(out)
        n = out.num_rows
        decode = self.decode_kernel and out.is_pure_decode
        # A graph cannot call back into Python per layer. Only steps that send KV (rows in `out.transfers`) need
        # the per-layer hook (kv_transfer's on_layer does nothing in other steps), so only those run eagerly.
        hooks = extension is not None and bool(out.transfers)
        graph = decode and self.graphs is not None and not hooks and n <= self.graphs.max_batch
        meta = None
        split = None  # a mixed step's decode rows, replayed apart from its prompts (engine.mixed_steps)
        if self.decode_kernel and self.graphs is not None and not hooks and not out.is_pure_decode:
            split = mixed_steps.decode_rows(out, self.graphs.max_batch)
        if graph:  # inputs written straight into the graph's static buffers
            bucket = self.graphs.bucket_for(n)
            static, static_tables = self.graphs.static_inputs(bucket)
            inp = self.batch.prepare(out, bucket, ids_out=static[TOKEN])
            static[POSITION:].copy_(inp.packed[POSITION:LENGTH + 1])
            torch.index_select(self.batch.tables, 0, inp.packed[BATCH_SLOT], out=static_tables)
        else:
            inp = self.batch.prepare(out, out.total_tokens)
            if decode:
                tables = self.batch.tables[inp.packed[BATCH_SLOT]]  # [num_seqs, max blocks per sequence]
                meta = AttentionMetadata.for_decode(inp.packed[SLOT], inp.packed[LENGTH], tables)
            elif split is None:
                meta = self._torch_metadata(out, inp)
        if extension is not None:
            extension.begin_step(out)
        try:
            logits = None
            if graph:
                logits = self.graphs.replay(bucket, n)  # [n, vocab] float32
                if len(inp.sample_rows) < n:  # a one-token prompt chunk mid-prompt is a decode row that samples not
                    logits = logits[to_device(inp.sample_rows, self.device)]
                hidden = logits
            elif split is not None:
                logits = hidden = mixed_steps.run_split(self, out, inp, split)  # [sampling rows, vocab] float32
            else:
                if extension is not None:
                    meta.on_layer_kv_written = extension.on_layer
                with attention_context(meta):
                    hidden = self.model(inp.input_ids, inp.packed[POSITION])  # [num_tokens, hidden]
        except BaseException:
            if extension is not None:
                extension.abort_step(out)  # e.g. a half-sent step: its channels must not be reused as is
            raise
        events = [extension.end_step(out)] if extension is not None else []
        so = self._sample(out, inp, hidden, decode, logits)
        asked = self.batch.logprobs[np.asarray(out.slots, dtype=np.int64)[inp.sample_rows]]
        return PendingStep(out, inp, so, get_tp().rank == 0, events, asked)

    def _sample(self, out: SchedulerOutput, inp: StepInputs, hidden: torch.Tensor, decode: bool,
                logits: torch.Tensor | None = None) -> SamplerOutput | None:
        """`logits`: a decode graph's, one row per (sampling) row; else computed here from `hidden`."""
        if inp.sampling is None:
            return None
        if logits is None:
            rows = inp.sample_rows
            if len(rows) < hidden.shape[0]:  # else every row of `hidden` is a sampling row's last token, in order
                ends = rows if decode else inp.query_start[1:][rows] - 1
                hidden = hidden[to_device(np.ascontiguousarray(ends), self.device)]
            logits = self.model.compute_logits(hidden)  # [num_sampled, vocab], the full vocabulary on every rank
        so = self.sampler(logits, inp.sampling)
        self.batch.record_sampled(inp.sample_slots, so.token_ids)
        return so
