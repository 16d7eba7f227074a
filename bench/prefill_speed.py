"""Prefill throughput of the single-process engine vs the matmul roofline and a HuggingFace forward pass.

    python -m bench.prefill_speed --shape llama-3.2-1b llama-3.1-8b --cases 1x512 1x2048 1x8192 4x2048 16x512
    python -m bench.prefill_speed --device cpu --shape tiny --cases 1x32 2x16 --reps 1   # dry run

Random weights of a real model's shape (bfloat16 on GPU). A case BxL is one engine step that prefills B prompts
of L tokens and samples each one's first token (the whole batch fits the step's token budget). FLOPs count the
layers' matmuls (2 per weight per token), causal attention and the LM head on each prompt's last token
(`bench_models.prefill_flops`); the roofline is those FLOPs at the large bf16 matmul rate measured in the same
run. The HF baseline is one forward pass of the same batch (logits of the last token only), same process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch

from bench.bench_models import (
    DTYPES,
    SHAPES,
    free,
    hf_model,
    kv_bytes_per_token,
    matmul_flops,
    prefill_flops,
    sync,
    write_config,
)


def parse_case(text: str) -> tuple[int, int]:
    b, _, n = text.partition("x")
    return int(b), int(n)


def time_ours(llm, prompts: list[list[int]], device: str) -> float:
    from engine import SamplingParams

    eng = llm.engine
    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i, pr in enumerate(prompts):
        eng.add_request(f"p{i}", pr, p)
    sync(device)
    t = time.perf_counter()
    outs = eng.step()
    sync(device)
    elapsed = time.perf_counter() - t
    if eng.has_unfinished_requests() or sum(o.finished for o in outs) != len(prompts):
        raise RuntimeError("the batch did not prefill in one step; raise --max-batched-tokens")
    return elapsed


def time_hf(model, prompts: list[list[int]], device: str) -> float:
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        model(ids, logits_to_keep=1).logits.argmax(-1).tolist()
        sync(device)
        return time.perf_counter() - t


def bench_shape(args, shape: str, rng: random.Random, rate: float) -> list[dict]:
    from engine import LLM

    cases = [parse_case(c) for c in args.cases]
    most = max(b * n for b, n in cases)
    longest = max(n for _, n in cases)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = {c: [[rng.randrange(3, vocab) for _ in range(c[1])] for _ in range(c[0])] for c in cases}
    ours: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory() as d:
        kv = kv_bytes_per_token(shape, DTYPES[args.dtype].itemsize)
        llm = LLM(write_config(d, shape, args.dtype), dtype=args.dtype, device=args.device, load_format="dummy",
                  max_num_seqs=max(b for b, _ in cases), max_num_batched_tokens=most, max_model_len=longest + 16,
                  kv_cache_memory=int(1.2 * (most + 16 * len(cases)) * kv) + (64 << 20), enable_prefix_caching=False)
        for c in cases:
            time_ours(llm, prompts[c], args.device)  # warm-up at this shape
            ours[c] = statistics.median(time_ours(llm, prompts[c], args.device) for _ in range(args.reps))
            print(f"{shape} {c[0]}x{c[1]}: {ours[c] * 1e3:.2f} ms", flush=True)
        llm.shutdown()
        del llm
    free(args.device)
    theirs: dict[tuple[int, int], float] = {}
    if not args.no_hf:
        hf = hf_model(shape, args.device, args.dtype)
        for c in cases:
            time_hf(hf, prompts[c], args.device)
            theirs[c] = statistics.median(time_hf(hf, prompts[c], args.device) for _ in range(args.reps))
            print(f"{shape} {c[0]}x{c[1]} HF: {theirs[c] * 1e3:.2f} ms", flush=True)
        del hf
        free(args.device)

    rows = []
    for c in cases:
        flops = prefill_flops(shape, c[1], c[0])
        hf = theirs.get(c, float("nan"))
        rows.append(dict(shape=shape, batch=c[0], prompt_len=c[1], tokens=c[0] * c[1], ms=ours[c] * 1e3,
                         tok_s=c[0] * c[1] / ours[c], flops=flops, tflops=flops / ours[c] / 1e12,
                         roofline_ms=flops / rate * 1e3, frac_of_roofline=flops / rate / ours[c],
                         hf_ms=hf * 1e3, hf_tflops=flops / hf / 1e12, speedup_vs_hf=hf / ours[c]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    ap.add_argument("--cases", nargs="+", default=["1x512", "1x2048", "1x8192", "4x2048", "16x512"],
                    help="BATCHxPROMPT_LEN, each prefilled in one step")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--no-hf", action="store_true", help="skip the HuggingFace baseline")
    ap.add_argument("--out", default="bench/results/prefill_speed.json")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    # The rate the matmuls could reach: a large square product in the run's dtype (8192^3 on GPU).
    rate = matmul_flops(args.device, 8192 if args.device == "cuda" else 256, DTYPES[args.dtype])
    rng = random.Random(0)
    rows = [r for shape in args.shape for r in bench_shape(args, shape, rng, rate)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(device=device, dtype=args.dtype, matmul_tflops=rate / 1e12, date=time.strftime("%Y-%m-%d"),
                  torch=torch.__version__, rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nprefill, {args.dtype} on {device}, matmul roofline {rate / 1e12:.3g} TFLOP/s")
    print(f"{'shape':>12} {'case':>7} {'ms':>8} {'tok/s':>8} {'TFLOP/s':>8} {'of roof':>7} {'HF ms':>8} {'vs HF':>6}")
    for r in rows:
        print(f"{r['shape']:>12} {str(r['batch']) + 'x' + str(r['prompt_len']):>7} {r['ms']:>8.2f} "
              f"{r['tok_s']:>8.0f} {r['tflops']:>8.3g} {r['frac_of_roofline']:>6.1%} {r['hf_ms']:>8.2f} "
              f"{r['speedup_vs_hf']:>5.2f}x")


if __name__ == "__main__":
    main()
