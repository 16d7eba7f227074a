"""Counter-based sampling noise: the uniform for vocabulary entry j of a request's output i is a hash of
(noise seed, i, j), so a seeded request draws the same noise alone or batched, on any rank, after a preemption,
and with async scheduling on or off, with no generator state on the host or the device.

The hash is 32-bit (Chris Wellons' lowbias32, applied three times per row key and once per entry) so that the
Triton kernel (uint32 arithmetic) and this torch version (int64 tensors masked to 32 bits) give the same bits.
A uniform keeps 23 bits: u = (2 * (h >> 9) + 1) / 2**24, exact in float32 and strictly inside (0, 1).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B


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


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys [n] -> [n, vocab] float32 Gumbel(0, 1) noise: -log(-log(u)) of each entry's uniform."""
    cols = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * GOLDEN32) & MASK32
    h = lowbias32(keys[:, None] ^ cols[None, :])
    u = ((h >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)
    return -torch.log(-torch.log(u))
