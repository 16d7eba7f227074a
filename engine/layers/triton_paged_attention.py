"""Triton kernels for pure-decode steps on CUDA: append K/V through the slot mapping, then attend over the paged
cache through the block tables, without gathering blocks into a padded copy.

Imported only on CUDA (triton need not be installed elsewhere). Both kernels have launch shapes that depend only on
the batch size, never on sequence lengths (lengths are read on the device), so they can be captured in a CUDA graph
once per batch-size bucket. Padded rows of a bucket carry slot -1 (no write) and length 0 (output zeros).

Decode attention is split-KV ("flash decoding") when the batch alone would leave SMs idle: program (b, kv head,
split) runs an online softmax over its share of sequence b's tiles for the G = H / Hkv query heads that share the KV
head (so each K/V tile is read once per group, not once per query head), writes a partial (acc, max, sum), and a
second kernel merges the splits. With one split the first kernel writes the output directly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Finite "minus infinity": an empty split keeps max = NEG_BIG and sum = 0, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     s_kt, s_kh, s_vt, s_vh, s_cb, s_ct, s_ch,
                     BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, HKV_P: tl.constexpr,
                     D: tl.constexpr, D_P: tl.constexpr):
    # One program per token: copy k[t], v[t] ([Hkv, D] each) into cache slot slot_mapping[t] unless it is < 0.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    mask = (h < HKV) & (d < D) & (slot >= 0)
    dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_ct + h * s_ch + d
    k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]."""
    t, hkv, d = k.shape
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HKV=hkv, HKV_P=triton.next_power_of_2(hkv), D=d, D_P=triton.next_power_of_2(d),
    )


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, out_ptr, part_ptr, ml_ptr, scale,
                   s_qt, s_qh, s_cb, s_ct, s_ch, s_bt, s_ot, s_oh,
                   BLOCK_SIZE: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                   D_P: tl.constexpr, TILE: tl.constexpr, WINDOW: tl.constexpr, SPLITS: tl.constexpr,
                   PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(len_ptr + b).to(tl.int32)  # tokens of sequence b (0 for a padded row)
    first = 0
    if WINDOW > 0:  # the query at position n - 1 sees keys at positions (n - 1 - WINDOW, n - 1]
        first = tl.maximum(n - WINDOW, 0)
    tile_lo = first // TILE
    num_tiles = tl.cdiv(n, TILE) - tile_lo
    per_split = tl.cdiv(num_tiles, SPLITS)
    t_start = tile_lo + split * per_split
    t_end = tl.minimum(t_start + per_split, tile_lo + num_tiles)

    g = tl.arange(0, G_P)  # query heads kvh * G + g share this KV head
    d = tl.arange(0, D_P)
    gmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + b * s_qt + (kvh * G + g)[:, None] * s_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [G_P, D_P]
    m_i = tl.full([G_P], NEG_BIG, tl.float32)
    l_i = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D_P], tl.float32)
    offs = tl.arange(0, TILE)
    for tile in range(t_start, t_end):
        pos = tile * TILE + offs  # [TILE] token positions
        valid = (pos < n) & (pos >= first)
        blk = tl.load(bt_ptr + b * s_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = blk * s_cb + (pos % BLOCK_SIZE) * s_ct + kvh * s_ch  # [TILE] element offset of each token's head
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [TILE, D_P]
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_P, TILE] float32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # masked keys: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    heads = kvh * G + g
    if SPLITS == 1:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]  # l_i = 0 only for a padded row (acc = 0): output 0
        tl.store(out_ptr + b * s_ot + heads[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
    else:
        # partials: acc [B, H, SPLITS, D_P] and (max, sum) [B, H, SPLITS, 2], all float32 and contiguous
        num_heads = tl.num_programs(1) * G
        base = (b * num_heads + heads) * SPLITS + split  # [G_P]
        tl.store(part_ptr + base[:, None] * D_P + d[None, :], acc, mask=gmask[:, None])
        tl.store(ml_ptr + base * 2, m_i, mask=gmask)
        tl.store(ml_ptr + base * 2 + 1, l_i, mask=gmask)


@triton.jit
def _merge_kernel(part_ptr, ml_ptr, out_ptr, s_ot, s_oh,
                  D: tl.constexpr, D_P: tl.constexpr, SPLITS: tl.constexpr):
    # One program per (sequence, query head): out = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M).
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * tl.num_programs(1) + h) * SPLITS
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D_P)
    m = tl.load(ml_ptr + (base + s) * 2)  # [SPLITS]
    l_s = tl.load(ml_ptr + (base + s) * 2 + 1)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: m = NEG_BIG, weight 0 (unless all are empty)
    total = tl.maximum(tl.sum(l_s * w, axis=0), 1e-30)
    acc = tl.load(part_ptr + (base + s)[:, None] * D_P + d[None, :])  # [SPLITS, D_P]
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + b * s_ot + h * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, per_sm: int = 2) -> int:
    """Splits per sequence so that about `per_sm` programs per SM exist (1 once the batch fills the GPU alone)."""
    want = -(-per_sm * num_sms // (num_seqs * num_kv_heads))
    return max(1, min(16, triton.next_power_of_2(want)))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int | None, splits: int | None = None, tile: int | None = None,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """One new query per sequence. q: [B, H, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables:
    [B, max_blocks] (entries past a sequence's length are never read); seq_lens: [B] tokens of KV including this
    step's. Returns [B, H, D] in q's dtype. Launch shapes depend on B and the model only (graph-capturable).
    `splits`, `tile` (tokens per loop iteration), `num_warps` and `num_stages` override the defaults (for
    benchmarks)."""
    bsz, h, d = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    d_p = triton.next_power_of_2(d)
    if splits is None:
        splits = num_splits(bsz, hkv, _num_sms(q.device.index) if q.is_cuda else 8)
    assert splits & (splits - 1) == 0 and q.stride(2) == 1 and block_tables.stride(1) == 1
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty(bsz, h, splits, d_p, dtype=torch.float32, device=q.device)
        ml = torch.empty(bsz, h, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    tile = tile or (64 if d_p <= 128 else 32)
    _decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, ml, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=k_cache.shape[1], G=g, G_P=max(16, triton.next_power_of_2(g)), D=d, D_P=d_p, TILE=tile,
        WINDOW=window or 0, SPLITS=splits, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_kernel[(bsz, h)](part, ml, out, out.stride(0), out.stride(1), D=d, D_P=d_p, SPLITS=splits)
    return out
