"""What serving costs on top of the engine, on one GPU: the same requests through the whole stack (client SDK ->
gRPC router -> a decode group running whole requests, `kvrelay serve --prefill-workers 0`) vs the engine alone
(`LLMEngine` stepping the same load in-process), measured in the same run.

    python -m bench.serving_overhead --shape llama-3.2-1b --requests 512 --concurrency 64 256 --out results/serve.json

Closed loop: `--concurrency` requests in flight, each `--input-len` prompt tokens and `--output-len` generated
tokens (ignore EOS), random bf16 weights of the model's shape. The table printed last gives output tokens/s of both
and their ratio per concurrency, with the TTFT and TPOT p50 of each: the engine's own (add to first token) and the
served run's as the client measured them. `--device cpu --shape tiny` is
the CPU dry run the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from bench.bench_models import free, write_config
from bench.disagg_vs_agg import Server
from bench.load.stats import summarize


def engine_alone(model: str, args: argparse.Namespace, dtype: str, concurrency: int) -> dict:
    """Output tokens/s of the engine stepping the same closed-loop load in this process, and its own TTFT and
    TPOT (from a request's add to its first token, and per later token), the baselines of the served run."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig.from_model_dir(model, dtype=dtype, device=args.device, load_format="dummy",
                                                max_num_seqs=concurrency, max_model_len=args.max_model_len,
                                                num_blocks=args.num_blocks))
    rng = random.Random(0)
    lo, hi = round(args.output_len * (1 - args.output_len_range)), round(args.output_len * (1 + args.output_len_range))
    vocab = eng.config.model.vocab_size
    sent = done = tokens = 0
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft: list[float] = []
    tpot: list[float] = []

    def add() -> None:
        nonlocal sent
        rid = f"r{sent}"
        eng.add_request(rid, [rng.randrange(3, vocab) for _ in range(args.input_len)],
                        SamplingParams(max_tokens=rng.randint(max(1, lo), max(1, hi)), temperature=0.0,
                                       ignore_eos=True))
        added[rid] = time.perf_counter()
        sent += 1

    for _ in range(min(args.warmup, args.requests)):  # warm-up (CUDA graphs, allocator), not timed
        add()
    while eng.has_unfinished_requests():
        eng.step()
    sent = 0
    added.clear()
    t0 = time.perf_counter()
    while sent < min(concurrency, args.requests):
        add()
    while done < args.requests:
        outs = eng.step()
        now = time.perf_counter()
        for out in outs:
            tokens += len(out.new_token_ids)
            rid = out.request_id
            if out.new_token_ids and rid not in first:
                first[rid] = now
                ttft.append(now - added[rid])
            if out.finished:
                done += 1
                if out.num_output_tokens > 1:
                    tpot.append((now - first[rid]) / (out.num_output_tokens - 1))
                if sent < args.requests:
                    add()  # closed loop: the next request as soon as one ends
    elapsed = time.perf_counter() - t0
    eng.shutdown()
    return {"output_throughput": tokens / elapsed, "ttft_ms": summarize(ttft, 1e3).to_json(),
            "tpot_ms": summarize(tpot, 1e3).to_json()}


def serve_flags(model: str, args: argparse.Namespace, dtype: str, concurrency: int) -> list[str]:
    """`kvrelay serve` flags of the served stack these benchmarks load: one decode group running whole requests
    (no prefill workers) with `concurrency` seats, random weights of `model`'s shape."""
    return ["--model", model, "--load-format", "dummy", "--dtype", dtype, "--device", args.device,
            "--prefill-workers", "0", "--decode-groups", "1", "--max-num-seqs", str(concurrency),
            "--max-model-len", str(args.max_model_len), "--max-queued-requests", str(args.requests)]


def through_the_stack(model: str, args: argparse.Namespace, dtype: str, tmp: str, concurrency: int) -> dict:
    serve = serve_flags(model, args, dtype, concurrency)
    if args.num_blocks:
        serve += ["--decode-num-blocks", str(args.num_blocks)]
    out = os.path.join(tmp, "bench.json")
    with Server(serve, os.path.join(tmp, "serve.log"), 900) as target:
        subprocess.run([sys.executable, "-m", "bench.load", "--target", target, "--concurrency",
                        str(concurrency), "--num-requests", str(args.requests), "--warmup", str(args.warmup),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--output-len-range",
                        str(args.output_len_range), "--ignore-eos", "--processes", str(args.load_processes),
                        "--seed", "0", "--quiet", "--out", out], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    with open(out) as f:
        doc = json.load(f)
    if args.out:  # the load generator's whole report (per-request records, timeline) beside the summary
        shutil.copy(out, f"{os.path.splitext(args.out)[0]}.load-{concurrency}.json")
    metrics = doc["metrics"]
    # Server-side timings of each request (the router's: waiting for a seat, and arrival to first token), to
    # tell the stack's latency from the load generator's.
    timings = [r["server_timings_ms"] for r in doc["requests"] if r.get("server_timings_ms")]
    for key in ("queued", "first_token"):
        s = summarize([t[key] for t in timings])
        metrics[f"server_{key}_ms"] = s.to_json() if s is not None else None
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64], help="requests in flight (one run each)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-len-range", type=float, default=0.0, metavar="R",
                   help="output lengths uniform in len*(1 +- R), in both runs (0: all equal, whose closed loop "
                        "settles into waves of requests that start and end together)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--load-processes", type=int, default=1, metavar="N",
                   help="client processes of the load generator (its --processes): more when its CPU is the ceiling")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: sized from memory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_config(model, args.shape, dtype)
        for c in args.concurrency:
            alone = engine_alone(model, args, dtype, c)
            free(args.device)  # the engine's GPU memory goes back before the served stack loads the model again
            served = through_the_stack(model, args, dtype, tmp, c)
            runs.append({"concurrency": c, "engine": alone, "serving": served,
                         "serving_vs_engine": served["output_throughput"] / alone["output_throughput"],
                         "ttft_p50_over_engine_ms": served["ttft_ms"]["p50"] - alone["ttft_ms"]["p50"]})
    report = {"shape": args.shape, "device": _device_name(args.device), "args": vars(args), "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\n{args.shape} on {report['device']}: {args.requests} requests per run, {args.input_len} -> "
          f"{args.output_len} (+-{args.output_len_range:.0%}) tokens, closed loop")
    print(f"{'in flight':>9} {'engine tok/s':>13} {'served tok/s':>13} {'served/alone':>13} {'TTFT p50 eng':>13} "
          f"{'TTFT p50 srv':>13} {'router TTFT':>12} {'TPOT p50 eng':>13} {'TPOT p50 srv':>13}")
    for r in runs:
        e, v = r["engine"], r["serving"]
        print(f"{r['concurrency']:>9} {e['output_throughput']:>13.0f} {v['output_throughput']:>13.0f} "
              f"{r['serving_vs_engine']:>12.2f}x {e['ttft_ms']['p50']:>11.1f}ms {v['ttft_ms']['p50']:>11.1f}ms "
              f"{(v.get('server_first_token_ms') or {}).get('p50', float('nan')):>10.1f}ms "
              f"{e['tpot_ms']['p50']:>11.2f}ms {v['tpot_ms']['p50']:>11.2f}ms")
    return 0


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
