"""Triton kernel of the sampling draw on CUDA: `engine.sampling_noise.rejection_sample`, one program per row, in
a few passes over the row's logits (max and normaliser, then per round a Gumbel-max over the entries above the pivot
and the mass and count above the candidate) and no [n, vocab] temporaries: no sort, no host synchronisation. It
reproduces the torch reference's noise bits; greedy rows (temperature 0) take the first maximum, as torch.argmax.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from engine.sampling_noise import MAX_ROUNDS


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_params(row, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots):
    """The row's parameters from the persistent batch ([2, slots] float: temperature, top_p; int: top_k, seed):
    (temperature (1 for greedy rows), greedy, top_k, top_p, noise key of round 0)."""
    slot = tl.load(slot_ptr + row)
    t = tl.load(fparams_ptr + slot)
    top_p = tl.load(fparams_ptr + num_slots + slot)
    top_k = tl.load(iparams_ptr + slot)
    seed = tl.load(iparams_ptr + num_slots + slot)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)
    # sampling_noise.row_keys: the key of (seed, output index), in uint32 arithmetic.
    k = _lowbias32((seed & 0xFFFFFFFF).to(tl.uint32)) ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    index = tl.load(index_ptr + row)
    key0 = _lowbias32(_lowbias32(k) ^ (index & 0xFFFFFFFF).to(tl.uint32))
    return t, greedy, top_k, top_p, key0


@triton.jit
def _round(base, vocab, t, greedy, top_k, top_p, key, pivot, m, z, BLOCK: tl.constexpr):
    """One rejection round over a row: the Gumbel-max candidate among the entries of s = logits / t above
    `pivot` (the first maximum in vocabulary order; greedy rows take no noise), then whether it is inside top-k
    and top-p by the mass (normalised with the row's max `m` and normaliser `z`) and count of the entries above
    it. Returns (candidate, accepted, its s)."""
    best = tl.full((), float("-inf"), tl.float32)
    cand = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        s = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) / t
        h = _lowbias32(key ^ (offs.to(tl.uint32) * 0x9E3779B9))
        u = ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
        g = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))
        v = tl.where(inside & (s > pivot), s + g, float("-inf"))
        bm = tl.max(v, axis=0)
        bi = tl.argmax(v, axis=0).to(tl.int64) + start
        take = bm > best
        cand = tl.where(take, bi, cand)
        best = tl.where(take, bm, best)
    sv = tl.load(base + cand).to(tl.float32) / t
    mass = tl.full((), 0.0, tl.float32)
    count = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) / t
        above = s > sv
        mass += tl.sum(tl.where(above, tl.exp(s - m), 0.0), axis=0)
        count += tl.sum(above.to(tl.int64), axis=0)
    ok = greedy | (((top_p >= 1.0) | (mass / z < top_p)) & ((top_k <= 0) | (count < top_k)))
    return cand, ok, sv


@triton.jit
def _later_rounds(base, vocab, t, greedy, top_k, top_p, key, pivot, m, z, result, done,
                  FIRST: tl.constexpr, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """Rounds FIRST.. of a row not accepted yet (`done` 0), each from the last rejected candidate's `pivot`;
    a row never accepted within MAX_ROUNDS keeps the argmax. Returns the row's token."""
    for r in range(FIRST, MAX_ROUNDS):
        if r > 0:
            key = _lowbias32(key ^ 0x5BD1E995)  # sampling_noise.next_round_key
        if done == 0:
            cand, ok, sv = _round(base, vocab, t, greedy, top_k, top_p, key, pivot, m, z, BLOCK)
            result = tl.where(ok, cand, result)
            done = tl.where(ok, 1, 0)
            pivot = tl.where(ok, pivot, sv)
    if done == 0:  # never accepted within MAX_ROUNDS: the argmax is always kept
        best = tl.full((), float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            s = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            bm = tl.max(s, axis=0)
            bi = tl.argmax(s, axis=0).to(tl.int64) + start
            take = bm > best
            result = tl.where(take, bi, result)
            best = tl.where(take, bm, best)
    return result


@triton.jit
def _sample_kernel(logits_ptr, stride, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots, out_ptr, vocab,
                   MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row * stride
    t, greedy, top_k, top_p, key0 = _row_params(row, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots)
    # Online max and normaliser of s = logits / t.
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) / t
        m_new = tl.maximum(m, tl.max(s, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    pivot = tl.full((), float("-inf"), tl.float32)
    result = _later_rounds(base, vocab, t, greedy, top_k, top_p, key0, pivot, m, z, tl.full((), 0, tl.int64),
                           tl.full((), 0, tl.int32), 0, MAX_ROUNDS, BLOCK)
    tl.store(out_ptr + row, result)


def sample(logits: torch.Tensor, b: Any) -> torch.Tensor:
    """As `engine.sampling_noise.rejection_sample` over `b` (an engine.sampler.SamplingBatch: rows' slots and
    output indices, the persistent per-slot parameters): logits [n, vocab] float32 -> [n] int64 tokens. A small
    batch splits each row's first round over SPLIT_ROWS // n programs (see triton_sampling_split); a row that round
    rejects, and every row of a large batch, runs all its rounds in one program."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n and n * 2 <= SPLIT_ROWS:
        from engine.layers.triton_sampling_split import sample_split

        sample_split(logits, b, out, SPLIT_ROWS // n)
    elif n:
        _sample_kernel[(n,)](logits, logits.stride(0), b.slots, b.output_index, b.float_params, b.int_params,
                             b.float_params.shape[1], out, vocab, MAX_ROUNDS=MAX_ROUNDS, BLOCK=2048, num_warps=8)
    return out


# Below half this many rows a row's passes split across programs (n * splits = SPLIT_ROWS programs in all, 2 to 64
# per row): one program per row leaves most of the GPU's 132 multiprocessors idle and runs ~60 blocks of a 128k
# vocabulary one after another.
SPLIT_ROWS = 512
