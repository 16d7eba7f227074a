"""Model runner: owns the model and the KV tensors; turns a `SchedulerOutput` into one forward pass and samples.

It is the only place that touches both scheduling data and tensors. Per step it builds flat token ids, positions,
the slot mapping (where each new K/V goes) and the attention metadata, runs the model inside the attention
context, computes logits only for rows that sample, and synchronises with the host once to read the tokens.

On CUDA, pure-decode steps (one new token per sequence) take a fast path: the Triton paged-attention kernels,
replayed as a CUDA graph of the padded batch when the step needs no per-layer hook. Environment switches (read
once per runner): KVRELAY_ENFORCE_EAGER=1 disables the graphs, KVRELAY_DECODE_KERNEL=0 the Triton decode path (and
with it the graphs). CPU, prefill and mixed steps always run the portable torch path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import CacheConfig, ModelConfig, SchedulerConfig
from engine.cuda_graphs import DecodeGraphs
from engine.decode_inputs import LENGTH, POSITION, SLOT, TOKEN, is_pure_decode, prepare_decode
from engine.distributed.parallel_state import get_tp
from engine.layers.attention import Attention
from engine.layers.attention_context import AttentionMetadata, attention_context
from engine.models.loader import TORCH_DTYPES, load_model
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput

CPU_DEFAULT_KV_BYTES = 1 << 30  # with no budget given on CPU: 1 GiB of KV
MAX_GRAPH_BATCH = 512  # larger decode batches run the Triton path eagerly (launch overhead is small next to them)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "")


@dataclass
class StepResult:
    """Tokens sampled this step, by request id (only requests whose chunk reached their last token)."""

    token_ids: dict[str, int]
    # request id -> (logprob of the sampled token, [(token id, logprob)] top-n), for requests that asked.
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]
    # What each rank's worker extension returned from end_step, in rank order (empty without an extension).
    ext_events: list[Any] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, device: str = "cpu",
                 load_format: str = "auto", enforce_eager: bool | None = None,
                 decode_kernel: bool | None = None) -> None:
        """`enforce_eager` / `decode_kernel` default to the KVRELAY_ENFORCE_EAGER / KVRELAY_DECODE_KERNEL
        switches; both only matter on CUDA."""
        self.model_config, self.cache_config, self.sched_config = model, cache, sched
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" means the current device; pin it so memory queries work
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.dtype = TORCH_DTYPES[model.dtype]
        self.block_size = cache.block_size
        self.model = load_model(model, self.device, max_positions=sched.max_model_len, load_format=load_format)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(self.device)
        self.num_blocks = 0  # set by allocate_kv_cache (tensor-parallel ranks first agree on the count)
        cuda = self.device.type == "cuda"
        self.decode_kernel = cuda and (decode_kernel if decode_kernel is not None
                                       else _env_flag("KVRELAY_DECODE_KERNEL", True))
        eager = enforce_eager if enforce_eager is not None else _env_flag("KVRELAY_ENFORCE_EAGER", False)
        # Graphs with TP > 1 would capture NCCL all-reduces; not yet verified on several GPUs, so TP ranks run eager.
        self.use_graphs = self.decode_kernel and not eager and get_tp().size == 1
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
            max_blocks = -(-self.sched_config.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, min(self.sched_config.max_num_seqs, MAX_GRAPH_BATCH), max_blocks,
                                       self.device)
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
            + 4 * sc.max_num_seqs * m.vocab_size * 4
        budget = min(int(total * self.cache_config.gpu_memory_utilization) - weights, free) - reserve
        if budget < self.kv_block_bytes:
            raise ValueError(
                f"not enough GPU memory for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"weights take {weights / 2**30:.1f} GiB; raise gpu_memory_utilization or set kv_cache_memory"
            )
        return budget

    # ---- one step -----------------------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        max_q = max(len(s.token_ids) for s in out.seqs)
        max_blocks = max(len(s.block_table) for s in out.seqs)
        tables: list[list[int]] = []
        qpos: list[list[int]] = []
        pad_index: list[int] = []
        for b, s in enumerate(out.seqs):
            n = len(s.token_ids)
            input_ids.extend(s.token_ids)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            slots.extend(s.block_table[p // bs] * bs + p % bs for p in pos)
            query_start.append(query_start[-1] + n)
            seq_lens.append(s.start + n)
            tables.append(s.block_table + [0] * (max_blocks - len(s.block_table)))
            qpos.append(list(pos) + [0] * (max_q - n))
            pad_index.extend(range(b * max_q, b * max_q + n))

        def dev(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=dev(slots),
            query_start=query_start,
            seq_lens_host=seq_lens,
            seq_lens=dev(seq_lens),
            block_tables=dev(tables),
            query_positions=dev(qpos),
            query_pad_index=dev(pad_index),
            max_query_len=max_q,
            all_fresh_prefill=all(s.start == 0 for s in out.seqs),
        )
        return dev(input_ids), dev(positions), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, extension: Any = None) -> StepResult:
        """Run one step; `extension` (a worker extension) sees the step's start, each layer's KV, its end."""
        decode = self.decode_kernel and is_pure_decode(out.seqs)
        # A graph cannot call back into Python per layer. Only steps that send KV (a ScheduledSeq carrying
        # `transfer`) need the per-layer hook (kv_transfer's on_layer does nothing in other steps), so only
        # those run eagerly when an extension is present.
        hooks = extension is not None and any(s.transfer is not None for s in out.seqs)
        graph = decode and self.graphs is not None and not hooks and len(out.seqs) <= self.graphs.max_batch
        if graph:
            inputs = prepare_decode(out.seqs, self.block_size, self.graphs.bucket_for(len(out.seqs)))
        elif decode:
            inputs = prepare_decode(out.seqs, self.block_size, len(out.seqs))
            packed = inputs.packed.to(self.device, non_blocking=True)
            input_ids, positions = packed[TOKEN], packed[POSITION]
            meta = AttentionMetadata.for_decode(packed[SLOT], packed[LENGTH],
                                                inputs.block_tables.to(self.device, non_blocking=True))
        else:
            input_ids, positions, meta = self._prepare(out)
        if extension is not None:
            extension.begin_step(out)
        try:
            if graph:
                hidden = self.graphs.run(inputs)  # [num_seqs, hidden]
            else:
                if extension is not None:
                    meta.on_layer_kv_written = extension.on_layer
                with attention_context(meta):
                    hidden = self.model(input_ids, positions)  # [num_tokens, hidden]
        except BaseException:
            if extension is not None:
                extension.abort_step(out)  # e.g. a half-sent step: its channels must not be reused as is
            raise
        events = [extension.end_step(out)] if extension is not None else []
        # Row of each sequence's last token in `hidden` (pure decode: row b is sequence b).
        ends = list(range(len(out.seqs))) if decode else [e - 1 for e in meta.query_start[1:]]
        result = self._sample(out, ends, hidden)
        result.ext_events = events
        return result

    def _sample(self, out: SchedulerOutput, ends: list[int], hidden: torch.Tensor) -> StepResult:
        rows = [b for b, s in enumerate(out.seqs) if s.sample]
        if not rows:
            return StepResult({}, {})
        if len(rows) < hidden.shape[0]:  # otherwise every row is a sequence's last token, in order
            hidden = hidden[torch.tensor([ends[b] for b in rows]).to(self.device, non_blocking=True)]
        logits = self.model.compute_logits(hidden)  # [num_sampled, vocab]
        if get_tp().rank != 0:
            return StepResult({}, {})  # only rank 0 samples; other ranks just took part in the collectives
        seqs = [out.seqs[b] for b in rows]
        so = self.sampler(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs])
        tokens = so.token_ids.tolist()  # the step's one host synchronisation
        result = StepResult({s.request_id: t for s, t in zip(seqs, tokens)}, {})
        if so.sampled_logprobs is not None:
            lp = so.sampled_logprobs.tolist()
            top_lp = so.top_logprobs.tolist() if so.top_logprobs is not None else None
            top_ids = so.top_token_ids.tolist() if so.top_token_ids is not None else None
            for i, s in enumerate(seqs):
                n = s.params.logprobs
                if n is None:
                    continue
                top = list(zip(top_ids[i][:n], top_lp[i][:n])) if top_ids and top_lp and n else []
                result.logprobs[s.request_id] = (lp[i], top)
        return result
