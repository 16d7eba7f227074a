"""Triton matmuls for decode-sized batches on CUDA: y = x @ W.T for x [M, K] with few rows (M <= 16), W [N, K],
optionally with the element-wise kernel that precedes the matmul in a Llama layer run inside it (RMSNorm with the
residual add before q/k/v, SiLU(gate) * up before down).

At M <= 16 a linear layer is a pure weight read (2 bytes per weight for 2M FLOPs): what matters is keeping enough
loads in flight over all SMs. Program n streams rows [n * BN, (n + 1) * BN) of W once over the whole of K, with the
M rows of x (tiny, in L2) beside them: no split-K partials and no second kernel. M = 1 accumulates products in
float32 registers and reduces once at the end; M > 1 pads x to 16 rows for one tensor-core dot per tile. Both
accumulate in float32 like cuBLAS; only the reduction order differs.

The engine uses them for one row (a batch-1 decode step), where `prefers_skinny` says they beat cuBLAS; cuBLAS
keeps every other case (`bench.linear_speed` measures both). Imported only on CUDA through
`engine.layers.fused_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, res_out_ptr, M, N, K, s_xm, s_wn, s_om, s_rm, eps,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                   PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr):
    # x: [M, K] (PROLOGUE 2: [M, 2K]), w: [N, K], out: [M, N]; K % BK == 0 (checked by the caller).
    # PROLOGUE 1 (RMSNorm of x + residual, then the matmul): every program computes the rows' rms itself (x is a
    # few KB, read from L2); program 0 also writes x + residual to res_out for the next layer.
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    nmask = rn < N
    rows = rm[:, None] < M
    dtype = w_ptr.dtype.element_ty
    inv = tl.zeros([BM, 1], dtype=tl.float32)
    if PROLOGUE == 1:
        sq = tl.zeros([BM, BK], dtype=tl.float32)
        for k in range(0, K, BK):
            xs = tl.load(x_ptr + rm[:, None] * s_xm + k + rk[None, :], mask=rows, other=0.0)
            if HAS_RES:
                xs = xs + tl.load(res_ptr + rm[:, None] * s_rm + k + rk[None, :], mask=rows, other=0.0)
                if pid == 0:
                    tl.store(res_out_ptr + rm[:, None] * K + k + rk[None, :], xs, mask=rows)
            xf = xs.to(tl.float32)
            sq += xf * xf
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=1)[:, None] / K + eps)  # [BM, 1]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * s_wn + rk[None, :]  # [BN, BK]
    if USE_DOT:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(0, K, BK):
        w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * s_xm + k + rk[None, :], mask=rows, other=0.0)
        if PROLOGUE == 1:
            if HAS_RES:
                x = x + tl.load(res_ptr + rm[:, None] * s_rm + k + rk[None, :], mask=rows, other=0.0)
            y = (x.to(tl.float32) * inv).to(dtype).to(tl.float32)
            x = (tl.load(nw_ptr + k + rk[None, :]).to(tl.float32) * y).to(dtype)
        elif PROLOGUE == 2:
            g = x.to(tl.float32)
            u = tl.load(x_ptr + rm[:, None] * s_xm + K + k + rk[None, :], mask=rows, other=0.0).to(tl.float32)
            x = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            acc2 += w.to(tl.float32) * x.to(tl.float32)  # x: [1, BK] broadcast over the BN rows
        w_ptrs += BK
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc2, axis=1)[None, :]  # [1, BN]
    o_ptrs = out_ptr + rm[:, None] * s_om + rn[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=rows & nmask[None, :])


# (BN, BK, num_warps, num_stages) per path; overridable for benchmarks. One row: (8, 512) was the best of
# `bench.linear_speed`'s sweep for every matrix where the kernel beat cuBLAS (NVIDIA H200).
DEFAULT_ONE_ROW = (8, 512, 4, 3)
DEFAULT_FEW_ROWS = (32, 128, 4, 3)
MAX_ROWS = 16


def prefers_skinny(n: int, k: int) -> bool:
    """Whether one row x [1, k] @ W.T [k, n] runs faster here than in cuBLAS. Measured (`bench.linear_speed`, one
    H200, CUDA-graph replays over more weight copies than the L2 holds): faster for the q/k/v and o projections of
    Llama 1B and 8B (k 2048-4096, n 2048-6144: 6-10%) and for the LM head (n 128k: 2%); slower for gate/up (n
    16k-28k: 2-8%) and down (k 8k-14k, where cuBLAS splits k: 4-18%)."""
    return k % DEFAULT_ONE_ROW[1] == 0 and k <= 4096 and (n <= 8192 or n >= 65536)


def _launch(x: torch.Tensor, w: torch.Tensor, k: int, config, prologue: int, residual=None, norm_weight=None,
            eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = x.shape[0]
    n = w.shape[0]
    use_dot = m > 1
    bn, bk, warps, stages = config or (DEFAULT_FEW_ROWS if use_dot else DEFAULT_ONE_ROW)
    assert m <= MAX_ROWS and k % bk == 0 and x.stride(1) == 1 and w.is_contiguous() and w.shape[1] == k
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty(m, k, dtype=x.dtype, device=x.device) if residual is not None else None
    _skinny_kernel[(triton.cdiv(n, bn),)](
        x, w, out, residual if residual is not None else x, norm_weight if norm_weight is not None else w,
        res_out if res_out is not None else out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        BM=16 if use_dot else 1, BN=bn, BK=bk, USE_DOT=use_dot, PROLOGUE=prologue, HAS_RES=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out, res_out


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x: [M, K] (M <= 16, last dim contiguous), w: [N, K] contiguous -> x @ w.T [M, N] in x's dtype."""
    return _launch(x, w, x.shape[1], config, 0)[0]


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                w: torch.Tensor, config: tuple[int, int, int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`RMSNorm(x, residual)` then the matmul, in one kernel: returns (norm(x + residual) @ w.T, x + residual), the
    second as `triton_fused.rms_norm` returns it (x itself when residual is None). x, residual: [M, K]."""
    out, res_out = _launch(x, w, x.shape[1], config, 1, residual, norm_weight, eps)
    return out, res_out if res_out is not None else x


def silu_linear(gate_up: torch.Tensor, w: torch.Tensor,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`silu_and_mul(gate_up)` then the matmul, in one kernel. gate_up: [M, 2K] (gate then up), w: [N, K]."""
    return _launch(gate_up, w, gate_up.shape[1] // 2, config, 2)[0]
