"""Where a decode CUDA graph's GPU time goes: its kernels by group (matmuls, attention, RoPE + KV store, norms,
SiLU, the rest) per replay, their sum against the replay's wall time (the difference: launch gaps and tails
between kernels, which no kernel's own time shows), for model shapes and batch sizes (random weights).

    python -m bench.graph_profile --shape llama-3.2-1b llama-3.1-8b --batch 1 64 256

The graph replayed is the engine's own, after a few real decode steps of the batch (prompt 128), so it reads a
real batch's KV. Prints one table and writes JSON with every kernel's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from bench.bench_models import SHAPES, kv_bytes_per_token, write_config
from bench.decode_speed import replay_time, time_ours

GROUPS = (("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "_skinny", "_tiled", "cublas")),
          ("attention", ("_decode_kernel", "_merge_kernel")), ("rope+kv", ("_rope", "_store_kv")),
          ("norm", ("_rms_norm",)), ("silu", ("_silu",)))


def group_of(kernel: str) -> str:
    k = kernel.lower()
    return next((g for g, keys in GROUPS if any(key in k for key in keys)), "other")


def profile_graph(llm, batch: int, reps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    graphs = llm.engine.executor.runner.graphs
    graph = graphs.graphs[graphs.bucket_for(batch)]
    wall_us = replay_time(llm, batch, reps=50) * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [dict(kernel=e.key[:100], us=getattr(e, "device_time_total", 0.0) / reps, count=e.count / reps)
               for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k["us"] > 0), key=lambda k: -k["us"])
    groups: dict[str, float] = {}
    for k in kernels:
        k["group"] = group_of(k["kernel"])
        groups[k["group"]] = groups.get(k["group"], 0.0) + k["us"]
    busy = sum(k["us"] for k in kernels)
    n = sum(k["count"] for k in kernels)
    return dict(batch=batch, wall_us=wall_us, kernel_us=busy, gaps_us=wall_us - busy, kernels_per_replay=n,
                groups=groups, kernels=kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], nargs="+",
                    default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--top", type=int, default=6, help="kernels printed per case")
    ap.add_argument("--out", default="bench/results/graph_profile.json")
    args = ap.parse_args()
    from engine import LLM

    rng = random.Random(0)
    rows = []
    for shape in args.shape:
        max_b, max_len = max(args.batch), 512
        kv = kv_bytes_per_token(shape, 2)
        with tempfile.TemporaryDirectory() as d:
            llm = LLM(write_config(d, shape, "bfloat16"), dtype="bfloat16", device="cuda", load_format="dummy",
                      max_num_seqs=max_b, max_num_batched_tokens=max(2048, max_b * 128), max_model_len=max_len,
                      kv_cache_memory=int(1.2 * max_b * max_len * kv) + (64 << 20), enable_prefix_caching=False)
            for b in args.batch:
                prompts = [[rng.randrange(3, SHAPES[shape]["vocab_size"]) for _ in range(128)] for _ in range(b)]
                time_ours(llm, prompts, 8, "cuda")  # real steps: the graph's inputs now hold this batch
                row = dict(shape=shape, **profile_graph(llm, b))
                rows.append(row)
                print(f"{shape} batch {b}: replay {row['wall_us']:.0f} us, kernels {row['kernel_us']:.0f} us in "
                      f"{row['kernels_per_replay']:.0f} launches", flush=True)
                for k in row["kernels"][:args.top]:
                    print(f"   {k['us']:8.1f} us x{k['count']:<5.0f} [{k['group']}] {k['kernel'][:80]}", flush=True)
            llm.shutdown()
            del llm
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    names = [g for g, _ in GROUPS] + ["other"]
    print(f"\ndecode graph per replay, us, {result['device']}")
    print(f"{'shape':>12} {'batch':>5} {'replay':>7} {'kernels':>7} {'gaps':>6} {'launches':>8} "
          + "".join(f"{g:>10}" for g in names))
    for r in rows:
        print(f"{r['shape']:>12} {r['batch']:>5} {r['wall_us']:>7.0f} {r['kernel_us']:>7.0f} {r['gaps_us']:>6.0f} "
              f"{r['kernels_per_replay']:>8.0f} " + "".join(f"{r['groups'].get(g, 0.0):>10.0f}" for g in names))


if __name__ == "__main__":
    main()
