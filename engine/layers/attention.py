"""Paged attention: append this step's K/V into the cache blocks, then attend over each sequence's blocks.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim] (K and V) bound by the
runner. Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size; the runner
turns that into `slot_mapping`. Cached K/V are never rewritten: each step only appends.

The backend here is portable torch (CPU and CUDA): fresh prefills run causal SDPA on the new K/V directly; any
batch that reads cached KV (decode, chunked prefill, prefix hits) gathers each sequence's blocks into a padded
[num_seqs, max_blocks * block_size] view and runs one masked SDPA. Pure-decode steps on CUDA (metadata
`paged_decode`) use the Triton kernels of `triton_paged_attention` instead, which read the blocks in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention_context import AttentionMetadata, get_attention_metadata
from engine.layers.fused_ops import fused_kernels


def _mask(meta: AttentionMetadata, kv_len: int, window: int | None) -> torch.Tensor:
    """[num_seqs, 1, max_query_len, kv_len] bool: query at position p sees keys at positions in (p - window, p]."""
    mask = meta.masks.get(window)
    if mask is None or mask.shape[-1] != kv_len:
        kv_pos = torch.arange(kv_len, device=meta.query_positions.device)
        qp = meta.query_positions.unsqueeze(-1)  # [B, Q, 1]
        mask = kv_pos <= qp
        if window is not None:
            mask &= kv_pos > qp - window
        mask = mask.unsqueeze(1)
        meta.masks[window] = mask
    return mask


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    # q: [num_tokens, H, D]; caches: [num_blocks, block_size, Hkv, D] -> [num_tokens, H, D]
    num_seqs, max_q = meta.query_positions.shape
    h, d = q.shape[1], q.shape[2]
    qp = q.new_zeros(num_seqs * max_q, h, d)
    qp[meta.query_pad_index] = q
    qp = qp.view(num_seqs, max_q, h, d).transpose(1, 2)  # [B, H, Q, D]
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    kv_len = meta.block_tables.shape[1] * bs
    k = k_cache[meta.block_tables].view(num_seqs, kv_len, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[meta.block_tables].view(num_seqs, kv_len, hkv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp, k, v, attn_mask=_mask(meta, kv_len, window), scale=scale, enable_gqa=hkv != h
    )  # [B, H, Q, D]
    return out.transpose(1, 2).reshape(num_seqs * max_q, h, d)[meta.query_pad_index]


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    # Fresh prompts: causal attention over the step's own K/V, one SDPA per sequence. q: [T, H, D]; k, v: [T, Hkv, D]
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    if q.is_cuda and group > 1:
        # SDPA's fused CUDA kernels (flash, memory-efficient) need [B, H, L, D] inputs with as many K/V heads as
        # query heads; 3-D inputs or enable_gqa send it to the math kernel, which materialises the [H, L, L] scores
        # (2 s for one 8192-token 8B prompt instead of ~0.2 s). Repeat each KV head for its group, as HF's repeat_kv.
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [T, H, D]
    for b in range(len(meta.query_start) - 1):
        s, e = meta.query_start[b], meta.query_start[b + 1]
        if q.is_cuda:
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
                is_causal=True, scale=scale,
            )[0]  # [H, len, D]
        else:
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=group > 1,
            )  # [H, len, D]
        out[s:e] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    """Attention over the paged KV cache for this rank's heads. `k_cache`/`v_cache` are bound by the runner."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward_rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rotary: nn.Module) -> torch.Tensor:
        """`rotary(positions, q, k)`, then `forward`. A pure-decode step on CUDA rotates q and k while it stores
        K/V (one kernel instead of two per layer: the rotated k is only ever read back from the cache)."""
        meta = get_attention_metadata()
        if meta.paged_decode and (fused := fused_kernels(q)) is not None:
            q = fused.rope_and_store(positions, q, k, v, rotary.cos, rotary.sin, self.k_cache, self.v_cache,
                                     meta.slot_mapping)
            if meta.on_layer_kv_written is not None:
                meta.on_layer_kv_written(self.layer_idx)
            return self._attend(q, k, v, meta).reshape(q.shape[0], self.num_heads * self.head_dim)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H * D]
        meta = get_attention_metadata()
        d = self.head_dim
        if meta.paged_decode:
            from engine.layers import triton_paged_attention as tpa  # CUDA only: triton may be absent elsewhere

            tpa.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            if meta.on_layer_kv_written is not None:
                meta.on_layer_kv_written(self.layer_idx)
            return self._attend(q, k, v, meta).reshape(q.shape[0], self.num_heads * d)
        self.k_cache.view(-1, self.num_kv_heads, d)[meta.slot_mapping] = k
        self.v_cache.view(-1, self.num_kv_heads, d)[meta.slot_mapping] = v
        if meta.on_layer_kv_written is not None:
            meta.on_layer_kv_written(self.layer_idx)
        if meta.parts is None:
            return self._attend(q, k, v, meta).reshape(q.shape[0], self.num_heads * d)
        out = torch.empty_like(q)
        for tokens, part in meta.parts:  # tokens: [t] int64, the part's rows' tokens in the batch
            out[tokens] = self._attend(q[tokens], k[tokens], v[tokens], part)
        return out.reshape(q.shape[0], self.num_heads * d)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] (already in the cache) -> [T, H, D]
        if meta.paged_decode:
            from engine.layers import triton_paged_attention as tpa

            return tpa.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                              self.scale, self.sliding_window)
        longest = max(meta.seq_lens_host)
        if meta.all_fresh_prefill and (self.sliding_window is None or longest <= self.sliding_window):
            return prefill_attention(q, k, v, meta, self.scale)
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
