"""Which KV heads each tensor-parallel rank holds, and who sends which heads to whom (pure Python).

Rank r of a TP group of size T holds, of the model's H KV heads: heads [r*H/T, (r+1)*H/T) when H >= T, else the
single head r // (T/H) (each head replicated on T/H consecutive ranks) — the same split `QKVParallelLinear` uses.
A transfer plan gives each decode rank, as contiguous head slices, which prefill rank sends it which heads.
"""

from __future__ import annotations

from dataclasses import dataclass


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """Global KV head indices held by `rank`."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} out of range for tensor-parallel size {tp_size}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} ranks")
        n = num_kv_heads // tp_size
        return range(rank * n, (rank + 1) * n)
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {tp_size} ranks")
    h = rank // (tp_size // num_kv_heads)
    return range(h, h + 1)


@dataclass(frozen=True)
class HeadSlice:
    """Prefill rank `src_rank` sends its local heads [src_start, src_start+num) into the decode rank's local
    heads [dst_start, dst_start+num)."""

    src_rank: int
    src_start: int
    dst_start: int
    num: int


@dataclass(frozen=True)
class TransferPlan:
    num_kv_heads: int
    prefill_tp: int
    decode_tp: int
    # slices[d]: what decode rank d receives, in ascending destination order
    slices: tuple[tuple[HeadSlice, ...], ...]

    def sources(self, decode_rank: int) -> list[int]:
        """Prefill ranks that send to `decode_rank` (each over its own channel)."""
        return sorted({s.src_rank for s in self.slices[decode_rank]})

    def sends_of(self, prefill_rank: int) -> dict[int, list[HeadSlice]]:
        """decode rank -> the slices `prefill_rank` must send it."""
        out: dict[int, list[HeadSlice]] = {}
        for d, slices in enumerate(self.slices):
            for s in slices:
                if s.src_rank == prefill_rank:
                    out.setdefault(d, []).append(s)
        return out


def make_transfer_plan(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> TransferPlan:
    """For every head a decode rank needs, pick a prefill rank holding it (replicas are spread round-robin over
    decode ranks so that no prefill rank sends everything), then merge runs of consecutive heads."""
    plan = []
    for d in range(decode_tp):
        need = kv_heads_of_rank(num_kv_heads, decode_tp, d)
        slices: list[HeadSlice] = []
        for i, h in enumerate(need):
            holders = [p for p in range(prefill_tp) if h in kv_heads_of_rank(num_kv_heads, prefill_tp, p)]
            p = holders[d % len(holders)]
            src = h - kv_heads_of_rank(num_kv_heads, prefill_tp, p).start
            last = slices[-1] if slices else None
            if last and last.src_rank == p and last.src_start + last.num == src and last.dst_start + last.num == i:
                slices[-1] = HeadSlice(p, last.src_start, last.dst_start, last.num + 1)
            else:
                slices.append(HeadSlice(p, src, i, 1))
        plan.append(tuple(slices))
    return TransferPlan(num_kv_heads, prefill_tp, decode_tp, tuple(plan))
