"""GPU time of each decode matmul of a model shape (qkv, o, gate_up, down, LM head) at decode batch sizes: cuBLAS
(torch's default), cuBLASLt, and the Triton kernels of `engine.layers.triton_linear` (M <= 16) over a sweep of
tile configs, alone and with the element-wise kernel before them fused in (RMSNorm before qkv and gate_up, SiLU
before down) against that kernel + cuBLAS.

    python -m bench.linear_speed --shape llama-3.2-1b llama-3.1-8b --rows 1 8 64 256

Timed as the engine runs them: one CUDA graph calls the candidate on several copies of the weight in turn (more
bytes than the L2 holds, as a decode step reads every layer's weights once), replayed; microseconds per call.
Per case: the weight bytes read per second against the copy bandwidth measured in the run. The last table sums a
step's matmuls (layers x count + LM head) with their norm / SiLU kernels, unfused (cuBLAS) and best.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.bench_models import SHAPES, copy_bandwidth, head_dim

SKINNY = [(bn, bk, w, st) for bn in (8, 16, 32, 64) for bk in (128, 256, 512) for w in (4,) for st in (3,)
          if bn * bk <= 16384]
PROLOGUE = {"qkv": "norm", "gate_up": "norm", "down": "silu"}  # the element-wise kernel before each matmul
REFERENCE = {"norm_linear": "norm+cublas", "silu_linear": "silu+cublas"}  # what a fused kernel must equal


def matrices(shape: str) -> list[tuple[str, int, int, int]]:
    """(name, N, K, count per step) of a decode step's matmuls."""
    c, d = SHAPES[shape], head_dim(shape)
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    return [("qkv", qkv, h, n), ("o", h, c["num_attention_heads"] * d, n), ("gate_up", 2 * i, h, n),
            ("down", h, i, n), ("lm_head", c["vocab_size"], h, 1)]


def graph_us(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], reps: int = 10) -> float:
    """Microseconds per call of fn(w), captured in one CUDA graph over every weight copy, replayed."""
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(weights))


def candidates(name: str, m: int, k: int, x: torch.Tensor, sweep: bool) -> list[tuple[str, object, Callable]]:
    """(kind, config, fn(w)) to time; `x` is the matmul's input [m, k] (for down: gate_up [m, 2k])."""
    from engine.layers import triton_fused as tf
    from engine.layers import triton_linear as tli

    pro = PROLOGUE.get(name)
    res = torch.randn_like(x) if pro == "norm" else None
    nw = torch.rand(k, device=x.device).to(x.dtype) + 0.5
    act = x if pro != "silu" else tf.silu_and_mul(x)
    out: list[tuple[str, object, Callable]] = [("cublas", None, lambda w: F.linear(act, w))]
    if pro == "norm":
        out.append(("norm+cublas", None, lambda w: F.linear(tf.rms_norm(x, res, nw, 1e-5)[0], w)))
    elif pro == "silu":
        out.append(("silu+cublas", None, lambda w: F.linear(tf.silu_and_mul(x), w)))
    if m > tli.MAX_ROWS:
        return out
    configs = SKINNY if sweep else [tli.DEFAULT_FEW_ROWS if m > 1 else tli.DEFAULT_ONE_ROW]
    for c in configs:
        if k % c[1] or (m > 1 and c[0] < 16):
            continue
        out.append(("skinny", c, lambda w, c=c: tli.skinny_linear(act, w, c)))
        if pro == "norm":
            out.append(("norm_linear", c, lambda w, c=c: tli.norm_linear(x, res, nw, 1e-5, w, c)))
        elif pro == "silu":
            out.append(("silu_linear", c, lambda w, c=c: tli.silu_linear(x, w, c)))
    return out


def check(kind: str, fn: Callable, w: torch.Tensor, ref: torch.Tensor) -> None:
    got = fn(w)
    got = (got[0] if isinstance(got, tuple) else got).float()
    err = (got - ref).abs().max().item()
    if err > 0.05 * ref.abs().max().item() + 1e-3:
        raise RuntimeError(f"{kind} wrong: max error {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], nargs="+",
                    default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--no-sweep", action="store_true", help="Triton at its default configs only")
    ap.add_argument("--out", default="bench/results/linear_speed.json")
    args = ap.parse_args()
    bw = copy_bandwidth("cuda")
    rows = []
    for shape in args.shape:
        for name, n, k, count in matrices(shape):
            wbytes = n * k * 2
            copies = max(2, min(32, -(-(256 << 20) // wbytes)))
            weights = [torch.randn(n, k, device="cuda").to(torch.bfloat16) * 0.02 for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, 2 * k if PROLOGUE.get(name) == "silu" else k, device="cuda").to(torch.bfloat16)
                times: dict[str, tuple[float, object]] = {}
                cands = candidates(name, m, k, x, not args.no_sweep)
                refs = {kind: fn(weights[0]).float() for kind, config, fn in cands if config is None}  # cuBLAS
                for kind, config, fn in cands:
                    try:
                        if config is not None:
                            check(kind, fn, weights[0], refs[REFERENCE.get(kind, "cublas")])
                        us = graph_us(fn, weights)
                    except Exception as e:  # a config that fails to compile (shared memory) is skipped, said
                        print(f"  skip {kind} {config}: {str(e).splitlines()[0][:100]}", flush=True)
                        continue
                    if kind not in times or us < times[kind][0]:
                        times[kind] = (us, config)
                row = dict(shape=shape, matrix=name, n=n, k=k, m=m, count=count,
                           us={kind: t for kind, (t, _) in times.items()},
                           config={kind: c for kind, (_, c) in times.items() if c is not None},
                           frac_of_bw={kind: wbytes / (t * 1e-6) / bw for kind, (t, _) in times.items()})
                rows.append(row)
                print(f"{shape} {name} [{m}x{k}] x [{k}x{n}]: " + ", ".join(
                    f"{kind} {t:.1f} us ({row['frac_of_bw'][kind]:.0%})" for kind, (t, _) in times.items())
                    + (f"  configs {row['config']}" if row["config"] else ""), flush=True)
                del x
            del weights
            torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=bw / 1e9, date=time.strftime("%Y-%m-%d"),
                  torch=torch.__version__, rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nmatmuls of one decode step with their norm / SiLU kernels, us (sum over layers), {result['device']}, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'shape':>12} {'rows':>5} {'cublas':>9} {'best':>9} {'weights@bw':>10}")
    for shape in args.shape:
        for m in args.rows:
            rs = [r for r in rows if r["shape"] == shape and r["m"] == m]
            unfused = sum(r["count"] * r["us"].get(f"{PROLOGUE[r['matrix']]}+cublas" if r["matrix"] in PROLOGUE
                                                   else "cublas", float("nan")) for r in rs)
            best = sum(r["count"] * min(t for kind, t in r["us"].items()
                                        if r["matrix"] not in PROLOGUE or kind not in ("cublas", "skinny"))
                       for r in rs)
            ideal = sum(r["count"] * r["n"] * r["k"] * 2 for r in rs) / bw * 1e6
            print(f"{shape:>12} {m:>5} {unfused:>9.0f} {best:>9.0f} {ideal:>10.0f}")


if __name__ == "__main__":
    main()
