"""Fused Triton kernels for the element-wise parts of a Llama layer on CUDA: residual add + RMSNorm, rotary
embedding of q and k, and SiLU(gate) * up. Each replaces 5-14 eager torch kernels with one, which is what a decode
step (one token per sequence, so tiny tensors) pays for in launches, and saves passes over memory in prefill.

Numerics follow the torch/HF code they replace, rounding to the activation dtype where it rounds (residual sum,
normalised value before the weight, cos/sin tables, each product of the rotation); only reduction order differs.
Imported only on CUDA through `engine.layers.fused_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps, s_x, s_res, s_out,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: s = x + residual (rounded like torch); out = w * (s / rms(s)).to(dtype)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * s_res + offs, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * n + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] -> (norm(x + residual), x + residual), as `RMSNorm.forward`."""
    t, n = x.shape
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, n, eps, x.stride(0),
                           residual.stride(0) if residual is not None else 0, out.stride(0),
                           HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, res_out


@triton.jit
def _rotate(src, dst, s_h, s_dh, c1, c2, s1, s2, ok, NH: tl.constexpr, NH_P: tl.constexpr, HALF: tl.constexpr,
            HALF_P: tl.constexpr):
    # "Rotate half" layout, every head of one token (src, dst at its first head; heads s_h / s_dh apart); d < HALF:
    # out[d] = x[d] cos[d] - x[d + HALF] sin[d];  out[d + HALF] = x[d + HALF] cos[d + HALF] + x[d] sin[d + HALF]
    h = tl.arange(0, NH_P)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    m = (h < NH) & (d < HALF) & ok
    dtype = dst.dtype.element_ty
    x1 = tl.load(src + h * s_h + d, mask=m).to(tl.float32)
    x2 = tl.load(src + h * s_h + HALF + d, mask=m).to(tl.float32)
    o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    out = dst + h * s_dh + d
    tl.store(out, o1.to(dtype), mask=m)
    tl.store(out + HALF, o2.to(dtype), mask=m)


@triton.jit
def _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, s_cos, dtype, HALF: tl.constexpr, HALF_P: tl.constexpr):
    # The position's cos/sin halves, rounded to the activation dtype like `.to(q.dtype)`: 4 x [1, HALF_P]
    p = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF_P)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + p * s_cos + d, mask=dm).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + p * s_cos + HALF + d, mask=dm).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + p * s_cos + d, mask=dm).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + p * s_cos + HALF + d, mask=dm).to(dtype).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, s_qt, s_qh, s_kt, s_kh, s_cos,
                 H: tl.constexpr, HKV: tl.constexpr, H_P: tl.constexpr, HKV_P: tl.constexpr, HALF: tl.constexpr,
                 HALF_P: tl.constexpr):
    # One program per token: its position's cos/sin, then every q head and every k head (outputs contiguous).
    t = tl.program_id(0)
    c1, c2, s1, s2 = _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, s_cos, qo_ptr.dtype.element_ty, HALF, HALF_P)
    _rotate(q_ptr + t * s_qt, qo_ptr + t * H * 2 * HALF, s_qh, 2 * HALF, c1, c2, s1, s2, True, H, H_P, HALF, HALF_P)
    _rotate(k_ptr + t * s_kt, ko_ptr + t * HKV * 2 * HALF, s_kh, 2 * HALF, c1, c2, s1, s2, True, HKV, HKV_P, HALF,
            HALF_P)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T]; q: [T, H, D], k: [T, Hkv, D] (any strides, last dim contiguous); cos, sin: [max_pos, D]
    float32. Returns new contiguous rotated q and k."""
    t, h, d = q.shape
    hkv = k.shape[1]
    qo = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hkv, d, dtype=k.dtype, device=k.device)
    _rope_kernel[(t,)](q, k, positions, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       cos.stride(0), H=h, HKV=hkv, H_P=triton.next_power_of_2(h),
                       HKV_P=triton.next_power_of_2(hkv), HALF=d // 2,
                       HALF_P=triton.next_power_of_2(d // 2), num_warps=4)
    return qo, ko


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                       s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cos, s_cb, s_ct, s_ch,
                       BLOCK_SIZE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, H_P: tl.constexpr,
                       HKV_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    # One program per token: rotate its q heads into qo (contiguous [T, H, D]); rotate its k heads and copy its v
    # heads straight into cache slot slot_mapping[t] (none when the slot is < 0: a padded row).
    t = tl.program_id(0)
    c1, c2, s1, s2 = _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, s_cos, qo_ptr.dtype.element_ty, HALF, HALF_P)
    _rotate(q_ptr + t * s_qt, qo_ptr + t * H * 2 * HALF, s_qh, 2 * HALF, c1, c2, s1, s2, True, H, H_P, HALF, HALF_P)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = slot >= 0
    dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_ct
    _rotate(k_ptr + t * s_kt, kc_ptr + dst, s_kh, s_ch, c1, c2, s1, s2, ok, HKV, HKV_P, HALF, HALF_P)
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, 2 * HALF_P)[None, :]
    m = (h < HKV) & (d < 2 * HALF) & ok
    tl.store(vc_ptr + dst + h * s_ch + d, tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=m), mask=m)


def rope_and_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> torch.Tensor:
    """`rope` then the paged-decode KV store in one kernel (decode: the rotated k is only ever read from the cache).
    q: [T, H, D], k, v: [T, Hkv, D] (last dim contiguous); caches [num_blocks, block_size, Hkv, D]; slot_mapping
    [T]. Returns the rotated q, contiguous [T, H, D]; k and v land in the caches exactly as `rope` + `store_kv`."""
    t, h, d = q.shape
    hkv = k.shape[1]
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    qo = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    _rope_store_kernel[(t,)](q, k, v, positions, cos, sin, qo, k_cache, v_cache, slot_mapping,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             BLOCK_SIZE=k_cache.shape[1], H=h, HKV=hkv, H_P=triton.next_power_of_2(h),
                             HKV_P=triton.next_power_of_2(hkv), HALF=d // 2,
                             HALF_P=triton.next_power_of_2(d // 2), num_warps=4)
    return qo


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n, s_x, s_out, BLOCK: tl.constexpr):
    # x: [T, 2n] = [gate | up] -> out [T, n] = (silu(gate) rounded like torch) * up
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * s_x + n + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * s_out + offs, (a * u).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * n] (gate then up, as MergedColumnParallelLinear outputs them) -> [T, n]."""
    t, n2 = x.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
