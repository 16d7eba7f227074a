"""The sampling draw for small batches on CUDA: the first rejection round of `triton_sampling` split over the
vocabulary. One program per row runs its passes block after block over ~60 blocks of a 128k vocabulary while most
of the GPU idles; here `splits` programs per row each take a slice:

  1. per slice: the online max and normaliser of s = logits / T and the Gumbel-max candidate of round 0;
  2. per slice, after combining step 1's partials of its row: mass and count of the entries above the candidate;
  3. per row: accept the candidate when it is inside top-k and top-p, else run the remaining rounds in this one
     program from the rejected candidate (rarely more than one), exactly as `triton_sampling` would.

Same noise, same candidate (the first maximum over the row in order), so the same tokens as the one-program kernel
and the torch reference, up to float summation order in the mass of a borderline acceptance.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from engine.layers.triton_sampling import _later_rounds, _lowbias32, _row_params
from engine.sampling_noise import MAX_ROUNDS

BLOCK = 2048


@triton.jit
def _first_round_kernel(logits_ptr, stride, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots, part_ptr,
                        vocab, span, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # part[row, split] = (max, normaliser relative to it, best noisy score, its index) over the slice
    row, sp = tl.program_id(0), tl.program_id(1)
    base = logits_ptr + row * stride
    t, greedy, top_k, top_p, key = _row_params(row, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots)
    lo = sp * span
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.full((), 0.0, tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    cand = tl.full((), 0, tl.int64)
    for start in range(lo, lo + span, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = (offs < vocab) & (offs < lo + span)
        s = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) / t
        m_new = tl.maximum(m, tl.max(s, axis=0))
        z = tl.where(m_new == float("-inf"), 0.0, z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0))
        m = m_new
        h = _lowbias32(key ^ (offs.to(tl.uint32) * 0x9E3779B9))
        u = ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
        g = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))
        v = tl.where(inside, s + g, float("-inf"))
        bm = tl.max(v, axis=0)
        bi = tl.argmax(v, axis=0).to(tl.int64) + start
        take = bm > best
        cand = tl.where(take, bi, cand)
        best = tl.where(take, bm, best)
    out = part_ptr + (row * SPLITS + sp) * 4
    tl.store(out, m)
    tl.store(out + 1, z)
    tl.store(out + 2, best)
    tl.store(out + 3, cand.to(tl.float32))  # exact: vocabularies are far below 2**24


@triton.jit
def _combine(part_ptr, row, SPLITS: tl.constexpr):
    """(max, normaliser, candidate) of the row from its splits' partials; the first split with the best score
    wins a tie, as the first maximum in vocabulary order does."""
    idx = tl.arange(0, SPLITS)
    p = part_ptr + (row * SPLITS + idx) * 4
    ms, zs, bs, cs = tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)
    m = tl.max(ms, axis=0)
    z = tl.sum(tl.where(ms == float("-inf"), 0.0, zs * tl.exp(ms - m)), axis=0)
    win = tl.argmax(bs, axis=0)
    cand = tl.sum(tl.where(idx == win, cs, 0.0), axis=0).to(tl.int64)
    return m, z, cand


@triton.jit
def _mass_kernel(logits_ptr, stride, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots, part_ptr, mass_ptr,
                 vocab, span, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # mass[row, split] = (probability mass, count) of the slice's entries above the row's candidate
    row, sp = tl.program_id(0), tl.program_id(1)
    base = logits_ptr + row * stride
    t, greedy, top_k, top_p, key = _row_params(row, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots)
    m, z, cand = _combine(part_ptr, row, SPLITS)
    sv = tl.load(base + cand).to(tl.float32) / t
    lo = sp * span
    mass = tl.full((), 0.0, tl.float32)
    count = tl.full((), 0.0, tl.float32)
    for start in range(lo, lo + span, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = (offs < vocab) & (offs < lo + span)
        s = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) / t
        above = s > sv
        mass += tl.sum(tl.where(above, tl.exp(s - m), 0.0), axis=0)
        count += tl.sum(above.to(tl.float32), axis=0)
    out = mass_ptr + (row * SPLITS + sp) * 2
    tl.store(out, mass)
    tl.store(out + 1, count)


@triton.jit
def _finish_kernel(logits_ptr, stride, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots, part_ptr,
                   mass_ptr, out_ptr, vocab, SPLITS: tl.constexpr, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row * stride
    t, greedy, top_k, top_p, key = _row_params(row, slot_ptr, index_ptr, fparams_ptr, iparams_ptr, num_slots)
    m, z, cand = _combine(part_ptr, row, SPLITS)
    idx = tl.arange(0, SPLITS)
    mass = tl.sum(tl.load(mass_ptr + (row * SPLITS + idx) * 2), axis=0) / z
    count = tl.sum(tl.load(mass_ptr + (row * SPLITS + idx) * 2 + 1), axis=0).to(tl.int64)
    ok = greedy | (((top_p >= 1.0) | (mass < top_p)) & ((top_k <= 0) | (count < top_k)))
    # The first round rejected its candidate: go on as one program, from that candidate, as triton_sampling does.
    pivot = tl.load(base + cand).to(tl.float32) / t
    result = _later_rounds(base, vocab, t, greedy, top_k, top_p, key, pivot, m, z, cand, tl.where(ok, 1, 0), 1,
                           MAX_ROUNDS, BLOCK)
    tl.store(out_ptr + row, result)


def sample_split(logits: torch.Tensor, b: Any, out: torch.Tensor, splits: int) -> None:
    """Write the rows' tokens into `out` [n]; `splits` (a power of two is used, at most 64) programs per row."""
    n, vocab = logits.shape
    splits = 1 << min(6, max(1, splits).bit_length() - 1)
    span = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK  # whole blocks per slice
    part = torch.empty(n, splits, 4, dtype=torch.float32, device=logits.device)
    mass = torch.empty(n, splits, 2, dtype=torch.float32, device=logits.device)
    args = (logits, logits.stride(0), b.slots, b.output_index, b.float_params, b.int_params, b.float_params.shape[1])
    _first_round_kernel[(n, splits)](*args, part, vocab, span, SPLITS=splits, BLOCK=BLOCK, num_warps=8)
    _mass_kernel[(n, splits)](*args, part, mass, vocab, span, SPLITS=splits, BLOCK=BLOCK, num_warps=8)
    _finish_kernel[(n,)](*args, part, mass, out, vocab, SPLITS=splits, MAX_ROUNDS=MAX_ROUNDS, BLOCK=BLOCK,
                         num_warps=8)
