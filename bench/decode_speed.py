"""Decode speed of the single-process engine vs HuggingFace `generate` and the HBM roofline.

    python -m bench.decode_speed --shape llama-3.2-1b llama-3.1-8b --batch 1 8 64 256 --out results/decode.json
    python -m bench.decode_speed --device cpu --shape tiny --batch 1 2 --prompt-len 8 --gen 4   # dry run

Random weights of a real model's shape (bfloat16 on GPU). For each batch size: `batch` prompts of --prompt-len
tokens, --gen new tokens each (EOS ignored); decode time excludes the prefill step. Our engine runs in up to three
modes on the same weights: `graph` (Triton paged attention replayed as CUDA graphs: the default on GPU), `triton`
(the same kernels launched eagerly) and `torch` (the portable path: gathered blocks + SDPA, eager). The roofline
is (weight bytes + KV bytes read per step) / copy bandwidth, the bandwidth measured in the same run; HF `generate`
(greedy, batched, same prompts) runs in the same process after our engine is freed, for at most --hf-gen tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator

import torch

from bench.bench_models import (
    DTYPES,
    SHAPES,
    copy_bandwidth,
    decode_weight_bytes,
    free,
    hf_model,
    kv_bytes_per_token,
    sync,
    write_config,
)

MODES = ("graph", "triton", "torch")


@contextlib.contextmanager
def engine_mode(llm, mode: str) -> Iterator[None]:
    """Switch the runner's decode path for a measurement (benchmark-only reach into the runner)."""
    r = llm.engine.executor.runner
    saved = r.graphs, r.decode_kernel
    if mode == "triton":
        r.graphs = None
    elif mode == "torch":
        r.graphs, r.decode_kernel = None, False
    elif mode == "graph" and r.graphs is None:
        raise RuntimeError("mode 'graph' needs CUDA graphs (unset KVRELAY_ENFORCE_EAGER)")
    try:
        yield
    finally:
        r.graphs, r.decode_kernel = saved


VARIANTS = ("greedy-sync", "greedy-async", "sampled-sync", "sampled-async")


def variant_params(variant: str, gen: int, i: int):
    """Greedy, or what users mostly run: temperature 0.8, top_p 0.95 and a seed per request."""
    from engine import SamplingParams

    if variant.startswith("greedy"):
        return SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    return SamplingParams(max_tokens=gen, temperature=0.8, top_p=0.95, seed=1000 + i, ignore_eos=True)


def time_ours(llm, prompts: list[list[int]], gen: int, device: str, variant: str | None = None) -> dict:
    """Seconds of the prefill, and per decode step: wall time, host time (step() minus its waits for the
    device) and the runner's share (inputs, forward launch, sampling launch). `variant` None: greedy, with the
    engine's own async setting."""
    eng = llm.engine
    runner = eng.executor.runner
    if variant is not None:
        eng.async_scheduling = variant.endswith("-async")  # benchmark-only switch between steps of one engine
    for i, pr in enumerate(prompts):
        eng.add_request(f"r{i}", pr, variant_params(variant or "greedy", gen, i))
    sync(device)
    t0 = time.perf_counter()
    while not eng.step():  # until the prefill's tokens are collected (async: the first decode is then queued)
        pass
    sync(device)
    t1 = time.perf_counter()
    wait0 = eng.wait_s
    in_runner = [0.0]
    execute = runner.execute

    def timed(*a, **kw):  # benchmark-only wrapper: the runner's share of the step
        t = time.perf_counter()
        try:
            return execute(*a, **kw)
        finally:
            in_runner[0] += time.perf_counter() - t

    runner.execute = timed
    tokens = 0
    try:
        while eng.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in eng.step())
        sync(device)
    finally:
        del runner.execute
    if tokens != len(prompts) * (gen - 1):
        raise RuntimeError(f"expected {gen - 1} decode tokens per request, got {tokens / len(prompts)}")
    wall = time.perf_counter() - t1
    steps = gen - 1
    return dict(prefill_s=t1 - t0, step_s=wall / steps, host_s=(wall - (eng.wait_s - wait0)) / steps,
                runner_s=in_runner[0] / steps)


def replay_time(llm, batch: int, reps: int = 20) -> float:
    """Seconds per replay of the batch's decode graph alone, back to back (the GPU time of the forward and the LM
    head; the static inputs still hold the last step's batch, so it reads that batch's KV)."""
    graphs = llm.engine.executor.runner.graphs
    graph = graphs.graphs[graphs.bucket_for(batch)]
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def kernel_breakdown(llm, prompts: list[list[int]], top: int = 8) -> list[dict]:
    """GPU time by kernel of one decode step of `prompts`, run eagerly (Triton mode) under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    eng = llm.engine
    for i, pr in enumerate(prompts):
        eng.add_request(f"k{i}", pr, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    with engine_mode(llm, "triton"):
        eng.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.step()
            torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    rows = [dict(kernel=e.key[:90], ms=getattr(e, "device_time_total", 0.0) / 1e3, count=e.count)
            for e in prof.key_averages()]
    rows = sorted((r for r in rows if r["ms"] > 0), key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [dict(kernel="(all kernels)", ms=total, count=sum(r["count"] for r in rows))] + rows[:top]


def time_hf(model, prompts: list[list[int]], gen: int, device: str, reps: int = 2) -> float:
    """Seconds per decode step of HF generate: (time for gen tokens - time for 1 token) / (gen - 1), each time the
    best of `reps` (a difference of two times: one slow outlier could even make it negative on a busy host)."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t

    with torch.no_grad():
        run(2)  # warm-up
        return (min(run(gen) for _ in range(reps)) - min(run(1) for _ in range(reps))) / (gen - 1)


def bench_shape(args, shape: str, rng: random.Random, bw: float) -> list[dict]:
    from engine import LLM

    itemsize = DTYPES[args.dtype].itemsize
    modes = [m for m in args.modes if args.device == "cuda" or m == "torch"]
    max_b = max(args.batch)
    max_len = args.prompt_len + args.gen + 16
    kv_bytes = kv_bytes_per_token(shape, itemsize)
    prompts = {b: [[rng.randrange(3, SHAPES[shape]["vocab_size"]) for _ in range(args.prompt_len)]
                   for _ in range(b)] for b in args.batch}
    ours: dict[tuple[str, int], dict] = {}
    var: dict[tuple[str, int], dict] = {}
    replay: dict[int, float] = {}
    kernels: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(write_config(d, shape, args.dtype), dtype=args.dtype, device=args.device, load_format="dummy",
                  max_num_seqs=max_b, max_num_batched_tokens=max(2048, max_b * args.prompt_len),
                  max_model_len=max_len, kv_cache_memory=int(1.2 * max_b * max_len * kv_bytes) + (64 << 20),
                  enable_prefix_caching=False)
        for b in args.batch:
            for mode in modes:
                with engine_mode(llm, mode):
                    time_ours(llm, prompts[b], 3, args.device)  # warm-up at this batch (first graph replay)
                    ours[mode, b] = time_ours(llm, prompts[b], args.gen, args.device)
                    if mode == "graph":
                        replay[b] = replay_time(llm, b)
                print(f"{shape} batch {b} {mode}: {ours[mode, b]['step_s'] * 1e3:.2f} ms/step "
                      f"({ours[mode, b]['runner_s'] * 1e3:.2f} in the runner)", flush=True)
            with engine_mode(llm, modes[0]):
                for v in args.variants:
                    time_ours(llm, prompts[b], 3, args.device, v)
                    var[v, b] = time_ours(llm, prompts[b], args.gen, args.device, v)
                    print(f"{shape} batch {b} {modes[0]} {v}: {var[v, b]['step_s'] * 1e3:.2f} ms/step, host "
                          f"{var[v, b]['host_s'] * 1e3:.2f}", flush=True)
        if args.profile and args.device == "cuda":
            kernels = kernel_breakdown(llm, prompts[max_b])
            for k in kernels:
                print(f"{shape} batch {max_b} kernel {k['ms']:8.3f} ms x{k['count']:<4} {k['kernel']}", flush=True)
        llm.shutdown()
        del llm
    free(args.device)
    hf_step: dict[int, float] = {}
    hf_gen = min(args.gen, args.hf_gen)
    if not args.no_hf:
        hf = hf_model(shape, args.device, args.dtype)
        for b in args.batch:
            hf_step[b] = time_hf(hf, prompts[b], hf_gen, args.device)
            print(f"{shape} batch {b} HF: {hf_step[b] * 1e3:.2f} ms/step", flush=True)
        del hf
        free(args.device)

    weights = decode_weight_bytes(shape, itemsize)
    rows = []
    for b in args.batch:
        avg_ctx = args.prompt_len + args.gen / 2  # context length averaged over the decode steps
        roof = (weights + b * avg_ctx * kv_bytes) / bw
        best = modes[0]
        step = ours[best, b]["step_s"]
        hf = hf_step.get(b, float("nan"))
        rep = replay.get(b)
        rows.append(dict(
            shape=shape, batch=b, mode=best, step_ms=step * 1e3, tok_s=b / step, tok_s_per_seq=1 / step,
            prefill_ms=ours[best, b]["prefill_s"] * 1e3, modes_step_ms={m: ours[m, b]["step_s"] * 1e3 for m in modes},
            runner_ms=ours[best, b]["runner_s"] * 1e3, host_ms=ours[best, b]["host_s"] * 1e3,
            graph_replay_ms=rep * 1e3 if rep is not None else None,
            variants={v: dict(step_ms=var[v, b]["step_s"] * 1e3, host_ms=var[v, b]["host_s"] * 1e3,
                              runner_ms=var[v, b]["runner_s"] * 1e3, frac_of_roofline=roof / var[v, b]["step_s"],
                              step_over_replay=var[v, b]["step_s"] / rep if rep else None)
                      for v in args.variants},
            kernels=kernels if b == max_b else [],
            hf_step_ms=hf * 1e3, hf_tok_s=b / hf, hf_gen=hf_gen, speedup_vs_hf=hf / step,
            roofline_step_ms=roof * 1e3, frac_of_roofline=roof / step, weight_bytes=weights,
            kv_bytes_per_step=b * avg_ctx * kv_bytes,
        ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--hf-gen", type=int, default=32, help="HF generates at most this many tokens per batch")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="first one is reported")
    ap.add_argument("--variants", nargs="*", choices=VARIANTS, default=None,
                    help="greedy or sampled x async scheduling on or off, each timed in the first mode (default: "
                         "greedy-sync greedy-async, plus the sampled pair with --sampling)")
    ap.add_argument("--sampling", action="store_true",
                    help="also time sampling: temperature 0.8, top_p 0.95, a seed per request")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--no-hf", action="store_true", help="skip the HuggingFace baseline")
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel of one step at the largest batch")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.sampling or v.startswith("greedy")]
    if args.gen < 2 or args.hf_gen < 2:
        ap.error("--gen and --hf-gen must be at least 2 (decode steps are timed after the first token)")

    bw = copy_bandwidth(args.device, 2.0 if args.device == "cuda" else 0.125)
    rng = random.Random(0)
    rows = [r for shape in args.shape for r in bench_shape(args, shape, rng, bw)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(device=device, dtype=args.dtype, copy_bandwidth_GBps=bw / 1e9, prompt_len=args.prompt_len,
                  gen=args.gen, date=time.strftime("%Y-%m-%d"), torch=torch.__version__, rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\ndecode, {args.dtype} on {device}, copy bandwidth {bw / 1e9:.0f} GB/s, prompt {args.prompt_len}, "
          f"gen {args.gen} (HF {min(args.gen, args.hf_gen)})")
    others = [m for m in args.modes if m != rows[0]["mode"] and m in rows[0]["modes_step_ms"]]
    print(f"{'shape':>12} {'batch':>5} {'ms/step':>8} {'tok/s':>7} {'tok/s/seq':>9} "
          + "".join(f"{m + ' ms':>10}" for m in others)
          + f" {'runner':>7} {'replay':>7} {'HF ms':>7} {'vs HF':>6} {'roof ms':>7} {'of roof':>7}")
    for r in rows:
        replay = r["graph_replay_ms"] if r["graph_replay_ms"] is not None else float("nan")
        print(f"{r['shape']:>12} {r['batch']:>5} {r['step_ms']:>8.2f} {r['tok_s']:>7.0f} {r['tok_s_per_seq']:>9.1f} "
              + "".join(f"{r['modes_step_ms'][m]:>10.2f}" for m in others)
              + f" {r['runner_ms']:>7.2f} {replay:>7.2f} {r['hf_step_ms']:>7.2f} {r['speedup_vs_hf']:>5.2f}x "
              f"{r['roofline_step_ms']:>7.3f} {r['frac_of_roofline']:>6.1%}")
    print("runner: ms of the step inside ModelRunner.execute (inputs, forward, sampling); replay: the decode graph "
          "alone, back to back (GPU time of the forward and the LM head)")
    if args.variants:
        print(f"\n{'shape':>12} {'batch':>5} {'variant':>14} {'ms/step':>8} {'host ms':>8} {'replay':>7} "
              f"{'step/replay':>11} {'of roof':>7}")
        for r in rows:
            for v, x in r["variants"].items():
                ratio = f"{x['step_over_replay']:.2f}x" if x["step_over_replay"] else "n/a"
                print(f"{r['shape']:>12} {r['batch']:>5} {v:>14} {x['step_ms']:>8.2f} {x['host_ms']:>8.2f} "
                      f"{(r['graph_replay_ms'] or float('nan')):>7.2f} {ratio:>11} {x['frac_of_roofline']:>6.1%}")


if __name__ == "__main__":
    main()
