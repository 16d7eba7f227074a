"""Model runner: owns the model and the KV tensors; turns a `SchedulerOutput` into one forward pass and samples.

It is the only place that touches both scheduling data and tensors. Per step it builds flat token ids, positions,
the slot mapping (where each new K/V goes) and the attention metadata, runs the model inside the attention
context, computes logits only for rows that sample, and synchronises with the host once to read the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import CacheConfig, ModelConfig, SchedulerConfig
from engine.distributed.parallel_state import get_tp
from engine.layers.attention import Attention
from engine.layers.attention_context import AttentionMetadata, attention_context
from engine.models.loader import TORCH_DTYPES, load_model
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput

CPU_DEFAULT_KV_BYTES = 1 << 30  # with no budget given on CPU: 1 GiB of KV


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
                 load_format: str = "auto") -> None:
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

    def allocate_kv_cache(self, num_blocks: int | None = None) -> int:
        """Allocate `num_blocks` blocks (default: what this rank's budget allows); returns the count."""
        self.num_blocks = num_blocks if num_blocks is not None else self.local_num_blocks()
        a = self.attn_layers[0]
        # [2, layers, num_blocks, block_size, kv_heads, head_dim]: one allocation, per-layer views bound below.
        self.kv_cache = torch.zeros(2, len(self.attn_layers), self.num_blocks, self.block_size, a.num_kv_heads,
                                    a.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
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
        input_ids, positions, meta = self._prepare(out)
        if extension is not None:
            extension.begin_step(out)
            meta.on_layer_kv_written = extension.on_layer
        try:
            with attention_context(meta):
                hidden = self.model(input_ids, positions)  # [num_tokens, hidden]
        except BaseException:
            if extension is not None:
                extension.abort_step(out)  # e.g. a half-sent step: its channels must not be reused as is
            raise
        events = [extension.end_step(out)] if extension is not None else []
        result = self._sample(out, meta, hidden)
        result.ext_events = events
        return result

    def _sample(self, out: SchedulerOutput, meta: AttentionMetadata, hidden: torch.Tensor) -> StepResult:
        rows = [b for b, s in enumerate(out.seqs) if s.sample]
        if not rows:
            return StepResult({}, {})
        last = torch.tensor([meta.query_start[b + 1] - 1 for b in rows]).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[last])  # [num_sampled, vocab]
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
