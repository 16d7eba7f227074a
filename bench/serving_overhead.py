"""What serving costs on top of the engine, on one GPU: the same requests through the whole stack (client SDK ->
gRPC router -> a decode group running whole requests, `kvrelay serve --prefill-workers 0`) vs the engine alone
(`LLMEngine` stepping the same load in-process), measured in the same run.

    python -m bench.serving_overhead --shape llama-3.2-1b --requests 512 --concurrency 64 --out results/serve.json

Closed loop: `--concurrency` requests in flight, each `--input-len` prompt tokens and `--output-len` generated
tokens (ignore EOS), random bf16 weights of the model's shape. The table printed last gives output tokens/s of both
and their ratio, and the serving run's TTFT and TPOT as the client measured them. `--device cpu --shape tiny` is
the CPU dry run the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from bench.bench_models import free, write_config
from bench.disagg_vs_agg import Server


def engine_alone(model: str, args: argparse.Namespace, dtype: str) -> float:
    """Output tokens/s of the engine stepping the same closed-loop load in this process."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig.from_model_dir(model, dtype=dtype, device=args.device, load_format="dummy",
                                                max_num_seqs=args.concurrency, max_model_len=args.max_model_len,
                                                num_blocks=args.num_blocks))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    vocab = eng.config.model.vocab_size
    sent = done = tokens = 0

    def add() -> None:
        nonlocal sent
        eng.add_request(f"r{sent}", [rng.randrange(3, vocab) for _ in range(args.input_len)], params)
        sent += 1

    for _ in range(min(args.warmup, args.requests)):  # warm-up (CUDA graphs, allocator), not timed
        add()
    while eng.has_unfinished_requests():
        eng.step()
    sent = 0
    t0 = time.perf_counter()
    while sent < min(args.concurrency, args.requests):
        add()
    while done < args.requests:
        for out in eng.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                done += 1
                if sent < args.requests:
                    add()  # closed loop: the next request as soon as one ends
    elapsed = time.perf_counter() - t0
    eng.shutdown()
    return tokens / elapsed


def through_the_stack(model: str, args: argparse.Namespace, dtype: str, tmp: str) -> dict:
    serve = ["--model", model, "--load-format", "dummy", "--dtype", dtype, "--device", args.device,
             "--prefill-workers", "0", "--decode-groups", "1", "--max-num-seqs", str(args.concurrency),
             "--max-model-len", str(args.max_model_len), "--max-queued-requests", str(args.requests)]
    if args.num_blocks:
        serve += ["--decode-num-blocks", str(args.num_blocks)]
    out = os.path.join(tmp, "bench.json")
    with Server(serve, os.path.join(tmp, "serve.log"), 900) as target:
        subprocess.run([sys.executable, "-m", "bench.load", "--target", target, "--concurrency",
                        str(args.concurrency), "--num-requests", str(args.requests), "--warmup", str(args.warmup),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
                        "--seed", "0", "--quiet", "--out", out], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    with open(out) as f:
        return json.load(f)["metrics"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: sized from memory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_config(model, args.shape, dtype)
        alone = engine_alone(model, args, dtype)
        free(args.device)  # the engine's GPU memory goes back before the served stack loads the model again
        served = through_the_stack(model, args, dtype, tmp)
    ratio = served["output_throughput"] / alone
    report = {"shape": args.shape, "device": args.device, "args": vars(args), "engine_output_tok_s": alone,
              "serving": served, "serving_vs_engine": ratio}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    t, o = served["ttft_ms"], served["tpot_ms"]
    print(f"\n{args.shape} on {args.device}: {args.requests} requests, {args.concurrency} in flight, "
          f"{args.input_len} -> {args.output_len} tokens")
    print(f"{'engine alone tok/s':>19} {'served tok/s':>13} {'served/alone':>13} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}")
    print(f"{alone:>19.0f} {served['output_throughput']:>13.0f} {ratio:>12.2f}x {t['p50']:>7.1f}ms "
          f"{t['p99']:>7.1f}ms {o['p50']:>7.2f}ms {o['p99']:>7.2f}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
