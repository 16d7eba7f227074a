"""Triton kernel for the sampling draw on CUDA: per row, argmax over the vocabulary of logits / temperature plus
counter-based Gumbel noise (see `engine.sampling_noise`, whose bits it reproduces), skipping entries below the
row's top-k/top-p threshold. Gumbel-max equals sampling from softmax(logits / T) restricted to the kept entries.
One read of the logits and no [n, vocab] temporaries, where the torch version makes a dozen passes over them.
Greedy rows (temperature 0) take the plain argmax (first maximum, as torch.argmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride, temp_ptr, thresh_ptr, key_ptr, out_ptr, vocab,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row)
    greedy = t == 0.0
    t = tl.where(greedy, 1.0, t)
    thresh = tl.load(thresh_ptr + row)
    key = tl.load(key_ptr + row).to(tl.uint32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        s = tl.load(logits_ptr + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32) / t
        h = _lowbias32(key ^ (offs.to(tl.uint32) * 0x9E3779B9))
        u = ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
        g = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))
        v = tl.where(inside & (s >= thresh), s + g, float("-inf"))
        m = tl.max(v, axis=0)
        i = tl.argmax(v, axis=0).to(tl.int64) + start
        take = m > best
        best_idx = tl.where(take, i, best_idx)
        best = tl.where(take, m, best)
    tl.store(out_ptr + row, best_idx)


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor,
                  keys: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] float32; temperature [n] float32 (0 = greedy); threshold [n] float32 on the scaled
    logits (-inf = keep all); keys [n] int64 row keys -> [n] int64 token ids."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        _gumbel_argmax_kernel[(n,)](logits, logits.stride(0), temperature, threshold, keys, out, vocab,
                                    BLOCK=2048, num_warps=8)
    return out
