"""Where a decode step's host time goes: the Python functions (and the torch/numpy calls they make, as builtins) of
steady-state decode steps by own time, under cProfile, for one shape and batch (random weights).

    python -m bench.step_profile --shape llama-3.2-1b --batch 1 256 --steps 20
    python -m bench.step_profile --device cpu --shape tiny --batch 2 --steps 4      # dry run

Prints per batch a table of the top entries (own ms and cumulative ms per step) and writes them as JSON. cProfile
slows Python down, so the totals overstate host time; the ranking is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from bench.bench_models import DTYPES, SHAPES, kv_bytes_per_token, write_config
from bench.decode_speed import variant_params


def profile_batch(llm, prompts: list[list[int]], steps: int, variant: str, top: int) -> list[dict]:
    import cProfile
    import pstats

    eng = llm.engine
    eng.async_scheduling = variant.endswith("-async")
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, variant_params(variant, 3 * steps + 16, i))
    started: set[str] = set()
    while len(started) < len(prompts):  # past every prefill: only decode steps are profiled
        started.update(o.request_id for o in eng.step() if o.new_token_ids)
    for _ in range(2):
        eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    gpu = (gpu_timeline(eng, steps) + gpu_busy(eng, steps)) if torch.cuda.is_available() else []
    while eng.has_unfinished_requests():
        eng.step()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = [dict(name=f"{os.path.basename(f)}:{line} {fn}"[:90], self_cpu_ms=own * 1e3 / steps,
                 cpu_ms=cum * 1e3 / steps, calls=calls / steps, ours="/engine/" in f or "/kv_transfer/" in f)
            for (f, line, fn), (calls, _, own, cum, _) in stats.items()]
    by_own = sorted(rows, key=lambda r: -r["self_cpu_ms"])[:top]
    by_cum = sorted((r for r in rows if r["ours"]), key=lambda r: -r["cpu_ms"])[:top]
    sep = [dict(name="--- kvrelay functions by cumulative time ---", self_cpu_ms=0.0, cpu_ms=0.0, calls=0.0)]
    return by_own + sep + by_cum + gpu


def gpu_timeline(eng, steps: int) -> list[dict]:
    """Per step, the device time from the step's first queued operation to its last (its GPU work) and the gap
    from the previous step's last one (the GPU idle between steps), from CUDA events around the runner's
    execute: a step queued before the previous one ends shows no gap."""
    runner = eng.executor.runner
    execute = runner.execute
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(*a, **kw):  # benchmark-only wrapper
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return execute(*a, **kw)
        finally:
            end.record()
            marks.append((start, end))

    runner.execute = timed
    try:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    finally:
        del runner.execute
    busy = [s.elapsed_time(e) for s, e in marks]
    gaps = [max(0.0, marks[i - 1][1].elapsed_time(marks[i][0])) for i in range(1, len(marks))]
    return [dict(name=f"--- GPU timeline: busy {sum(busy) / len(busy):.3f} ms/step, idle between steps "
                      f"{sum(gaps) / max(len(gaps), 1):.3f} ms/step ({len(marks)} steps) ---",
                 self_cpu_ms=sum(busy) / len(busy), cpu_ms=sum(gaps) / max(len(gaps), 1), calls=float(len(marks)))]


def gpu_busy(eng, steps: int) -> list[dict]:
    """Wall time per step and the GPU's kernel time per step (the rest is the GPU idle), top kernels first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    kernels = [(e.key, getattr(e, "self_device_time_total", 0.0) / 1e3 / steps, e.count / steps)
               for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
    busy = sum(k[1] for k in kernels)
    rows = [dict(name=f"--- GPU: wall {wall * 1e3:.3f} ms/step (under the profiler), kernels {busy:.3f} ms/step ---",
                 self_cpu_ms=busy, cpu_ms=wall * 1e3, calls=0.0)]
    return rows + [dict(name=f"[gpu] {k[:80]}", self_cpu_ms=ms, cpu_ms=ms, calls=c) for k, ms, c in kernels[:12]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", default="greedy-sync", help="as bench.decode_speed's --variants")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="bench/results/step_profile.json")
    args = ap.parse_args()
    from engine import LLM

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    rng = random.Random(0)
    max_b = max(args.batch)
    result = dict(shape=args.shape, variant=args.variant, date=time.strftime("%Y-%m-%d"),
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", batches={})
    with tempfile.TemporaryDirectory() as d:
        kv = kv_bytes_per_token(args.shape, DTYPES[dtype].itemsize)
        llm = LLM(write_config(d, args.shape, dtype), dtype=dtype, device=args.device, load_format="dummy",
                  max_num_seqs=max_b, max_model_len=512, kv_cache_memory=int(1.2 * max_b * 512 * kv) + (64 << 20),
                  enable_prefix_caching=False)
        for b in args.batch:
            prompts = [[rng.randrange(3, SHAPES[args.shape]["vocab_size"]) for _ in range(128)] for _ in range(b)]
            rows = profile_batch(llm, prompts, args.steps, args.variant, args.top)
            result["batches"][b] = rows
            print(f"\n{args.shape} batch {b} {args.variant}: host time per step by entry (self CPU ms)")
            for r in rows:
                print(f"{r['self_cpu_ms']:8.3f} {r['cpu_ms']:8.3f} x{r['calls']:<6.1f} {r['name']}")
        llm.shutdown()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
