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
def _rotate(src, dst, t, s_t, s_h, c1, c2, s1, s2, NH: tl.constexpr, NH_P: tl.constexpr, HALF: tl.constexpr,
            HALF_P: tl.constexpr):
    # "Rotate half" layout, every head of token t: for d < HALF,
    # out[d] = x[d] cos[d] - x[d + HALF] sin[d];  out[d + HALF] = x[d + HALF] cos[d + HALF] + x[d] sin[d + HALF]
    h = tl.arange(0, NH_P)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    m = (h < NH) & (d < HALF)
    dtype = dst.dtype.element_ty
    x1 = tl.load(src + t * s_t + h * s_h + d, mask=m).to(tl.float32)
    x2 = tl.load(src + t * s_t + h * s_h + HALF + d, mask=m).to(tl.float32)
    o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    out = dst + (t * NH + h) * (2 * HALF) + d  # outputs are contiguous [T, NH, 2 * HALF]
    tl.store(out, o1.to(dtype), mask=m)
    tl.store(out + HALF, o2.to(dtype), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, s_qt, s_qh, s_kt, s_kh, s_cos,
                 H: tl.constexpr, HKV: tl.constexpr, H_P: tl.constexpr, HKV_P: tl.constexpr, HALF: tl.constexpr,
                 HALF_P: tl.constexpr):
    # One program per token: its position's cos/sin (rounded to the activation dtype like `.to(q.dtype)`), then
    # every q head and every k head.
    t = tl.program_id(0)
    p = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF_P)[None, :]
    dm = d < HALF
    dtype = qo_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + p * s_cos + d, mask=dm).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + p * s_cos + HALF + d, mask=dm).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + p * s_cos + d, mask=dm).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + p * s_cos + HALF + d, mask=dm).to(dtype).to(tl.float32)
    _rotate(q_ptr, qo_ptr, t, s_qt, s_qh, c1, c2, s1, s2, H, H_P, HALF, HALF_P)
    _rotate(k_ptr, ko_ptr, t, s_kt, s_kh, c1, c2, s1, s2, HKV, HKV_P, HALF, HALF_P)


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
