"""Counter-based sampling noise, and the draw that uses it.

The uniform for vocabulary entry j of a request's output i is a hash of (noise seed, i, j), so a seeded request
draws the same noise alone or batched, on any rank, after a preemption, and with async scheduling on or off, with
no generator state on the host or the device. The hash is 32-bit (Chris Wellons' lowbias32) so that the Triton
kernel (uint32 arithmetic) and this torch version (int64 tensors masked to 32 bits) give the same bits. A uniform
keeps 23 bits: u = (2 * (h >> 9) + 1) / 2**24, exact in float32 and strictly inside (0, 1).

The draw (`rejection_sample`, the reference the Triton kernel reproduces) never sorts the vocabulary. With
s = logits / temperature, round r takes the Gumbel-max over the entries above a pivot (round 0: all of them), which
samples softmax(s) restricted to them; the candidate is accepted when it lies inside top-k and top-p (fewer than k
entries and less than top_p of the mass above it), else it becomes the pivot. Every entry at or below a rejected
candidate is outside the nucleus, so the accepted token is distributed as softmax(s) renormalised over the kept
set, exactly as sort-and-mask sampling; usually the first round accepts. After MAX_ROUNDS the argmax is taken.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
ROUND32 = 0x5BD1E995  # below 2**31: a plain int32 constant in the Triton kernel
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B
MAX_ROUNDS = 32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """x: int64 tensor of values in [0, 2**32) -> its hash, same range. Products may pass 2**63 and wrap; the
    low 32 bits are still right."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, output_index: torch.Tensor) -> torch.Tensor:
    """seeds [n] int64 (>= 0), output_index [n] int64 -> [n] int64 keys in [0, 2**32), one per sampled token."""
    k = lowbias32(seeds & MASK32) ^ ((seeds >> 32) & MASK32)
    return lowbias32(lowbias32(k) ^ (output_index & MASK32))


def next_round_key(keys: torch.Tensor) -> torch.Tensor:
    """The noise key of the next rejection round (round 0 uses the row key itself)."""
    return lowbias32(keys ^ ROUND32)


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys [n] -> [n, vocab] float32 Gumbel(0, 1) noise: -log(-log(u)) of each entry's uniform."""
    cols = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * GOLDEN32) & MASK32
    h = lowbias32(keys[:, None] ^ cols[None, :])
    u = ((h >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)
    return -torch.log(-torch.log(u))


def rejection_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     keys: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] float32; temperature [n] (0 = greedy); top_k [n] (0 = off); top_p [n] (1 = off); keys [n]
    row keys -> [n] int64 tokens. The torch reference (CPU); it loops over rounds on the host."""
    greedy = temperature <= 0
    s = logits / torch.where(greedy, 1.0, temperature)[:, None]
    out = logits.argmax(dim=-1)
    weight = torch.exp(s - s.max(dim=-1, keepdim=True).values)  # [n, vocab], unnormalised probabilities
    total = weight.sum(dim=-1)
    pending = ~greedy
    pivot = torch.full_like(total, float("-inf"))
    for r in range(MAX_ROUNDS):
        if r:
            keys = next_round_key(keys)
        rows = pending.nonzero().squeeze(-1)
        if rows.numel() == 0:
            break
        sr = s[rows]
        noisy = torch.where(sr > pivot[rows, None], sr + gumbel(keys[rows], s.shape[1]), float("-inf"))
        cand = noisy.argmax(dim=-1)
        v = sr.gather(-1, cand[:, None])
        above = sr > v
        mass = (weight[rows] * above).sum(dim=-1) / total[rows]
        count = above.sum(dim=-1)
        ok = ((top_p[rows] >= 1.0) | (mass < top_p[rows])) & ((top_k[rows] <= 0) | (count < top_k[rows]))
        out[rows[ok]] = cand[ok]
        pending[rows[ok]] = False
        pivot[rows[~ok]] = v.squeeze(-1)[~ok]
    return out
