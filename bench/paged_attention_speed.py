"""Decode attention alone, one layer: the Triton paged kernel (a few tile / warp settings) vs the portable torch
path (gather blocks + masked SDPA), against the bandwidth roofline. GPU only (the kernel is CUDA-only).

    python -m bench.paged_attention_speed --shape llama-3.1-8b --batch 1 8 64 256 --ctx 192 1024 4096

Each sequence's blocks are scattered at random over the cache. Roofline: the K and V bytes of every sequence's
context read once (plus q and the output) over the copy bandwidth measured in the same run. Each call is timed as
a CUDA graph replay (`triton.testing.do_bench_cudagraph`, median), as the engine runs it: timed eagerly, a small
case would measure the Python launch, not the kernel. Small cases fit in L2 (50 MB on an H100) across replays.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.bench_models import SHAPES, copy_bandwidth, head_dim
from engine.layers.attention import paged_attention
from engine.layers.attention_context import AttentionMetadata

# name -> (tile, num_warps, num_stages, programs per SM the splits aim at); "t64w4s2p2" is the engine's default
VARIANTS = {f"t{t}w{w}s{s}p{p}": (t, w, s, p) for t, w, s, p in (
    (64, 4, 2, 2), (64, 4, 3, 2), (64, 4, 4, 2), (32, 4, 3, 2), (128, 4, 3, 2), (128, 8, 3, 2), (64, 8, 3, 2),
    (64, 4, 3, 4), (64, 4, 3, 8), (32, 4, 3, 4), (128, 4, 3, 4), (16, 4, 4, 4))}


def make_case(shape: str, batch: int, ctx: int, block_size: int = 16, seed: int = 0):
    c = SHAPES[shape]
    h, hkv, d = c["num_attention_heads"], c["num_key_value_heads"], head_dim(shape)
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq + 1
    kc = torch.randn(num_blocks, block_size, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks - 1, device="cuda", generator=g)[: batch * per_seq].view(batch, per_seq) + 1
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
    q = torch.randn(batch, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, kc, vc, tables, lens


def torch_meta(tables: torch.Tensor, ctx: int) -> AttentionMetadata:
    b = tables.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"), query_start=list(range(b + 1)),
        seq_lens_host=[ctx] * b, seq_lens=torch.full((b,), ctx, device="cuda"), block_tables=tables,
        query_positions=torch.full((b, 1), ctx - 1, device="cuda"), query_pad_index=torch.arange(b, device="cuda"),
        max_query_len=1, all_fresh_prefill=False)


def measure(shape: str, b: int, ctx: int, variants: list[str]) -> dict[str, float]:
    """Median ms per call of each kernel variant and of the torch path, after checking they agree."""
    from triton.testing import do_bench_cudagraph

    from engine.layers.triton_paged_attention import _num_sms, num_splits, paged_decode_attention

    q, kc, vc, tables, lens = make_case(shape, b, ctx)
    scale = head_dim(shape) ** -0.5
    meta = torch_meta(tables, ctx)
    ref = paged_attention(q, kc, vc, meta, scale, None).float()
    times = {}
    for name in variants:
        tile, warps, stages, per_sm = VARIANTS[name]
        splits = num_splits(b, kc.shape[2], _num_sms(q.device.index), per_sm)

        def run(tile: int = tile, warps: int = warps, stages: int = stages, splits: int = splits) -> torch.Tensor:
            return paged_decode_attention(q, kc, vc, tables, lens, scale, None, splits=splits, tile=tile,
                                          num_warps=warps, num_stages=stages)

        err = ((run().float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"{name} disagrees with the torch path: relative error {err:.3g}")
        times[name] = do_bench_cudagraph(run, return_mode="median")
    times["torch"] = do_bench_cudagraph(lambda: paged_attention(q, kc, vc, meta, scale, None), return_mode="median")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], nargs="+", default=["llama-3.1-8b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[192, 1024, 4096])
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", default="bench/results/paged_attention_speed.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("paged_attention_speed needs a CUDA GPU (the Triton kernel runs only there)")

    bw = copy_bandwidth("cuda")
    rows = []
    for shape in args.shape:
        c = SHAPES[shape]
        for ctx in args.ctx:
            for b in args.batch:
                times = measure(shape, b, ctx, args.variants)
                torch.cuda.empty_cache()
                # K and V of every context token (bf16) + q and the output
                kv_bytes = 2 * 2 * c["num_key_value_heads"] * head_dim(shape) * b * ctx \
                    + 2 * 2 * b * c["num_attention_heads"] * head_dim(shape)
                roof_ms = kv_bytes / bw * 1e3
                best = min((t, n) for n, t in times.items() if n != "torch")
                rows.append(dict(shape=shape, batch=b, ctx=ctx, ms=times, kv_bytes=kv_bytes, roofline_ms=roof_ms,
                                 best=best[1], frac_of_roofline=roof_ms / best[0]))
                print(f"{shape} b={b} ctx={ctx}: " + " ".join(f"{n} {t * 1e3:.1f}us" for n, t in times.items()),
                      flush=True)
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=bw / 1e9, date=time.strftime("%Y-%m-%d"),
                  rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\none layer of decode attention, bf16 on {result['device']}, copy bandwidth {bw / 1e9:.0f} GB/s (us)")
    names = list(rows[0]["ms"])
    print(f"{'shape':>12} {'batch':>5} {'ctx':>5} " + "".join(f"{n:>8}" for n in names)
          + f" {'roof':>7} {'of roof':>7}")
    for r in rows:
        print(f"{r['shape']:>12} {r['batch']:>5} {r['ctx']:>5} "
              + "".join(f"{r['ms'][n] * 1e3:>8.1f}" for n in names)
              + f" {r['roofline_ms'] * 1e3:>7.1f} {r['frac_of_roofline']:>6.1%}")


if __name__ == "__main__":
    main()
