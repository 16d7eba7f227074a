"""Decode speed of the single-process engine vs HuggingFace `generate` and the HBM roofline, on one GPU.

    python -m bench.decode_speed --shape llama-3.2-1b --batch 1 16 64 --out results/decode.json

Random bfloat16 weights of a real model's shape. For each batch size: `batch` prompts of --prompt-len tokens,
--gen new tokens each (ignore EOS). Decode time excludes the prefill step. The roofline is
(weight bytes + KV bytes read per step) / copy bandwidth, the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 2 * 10 / (time.perf_counter() - t)


def make_model_dir(shape: str, path: str) -> int:
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                                   bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n


def time_ours(llm, prompts, gen: int) -> tuple[float, float]:
    from engine import SamplingParams

    eng = llm.engine
    p = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    for i, pr in enumerate(prompts):
        eng.add_request(f"r{i}", pr, p)
    sync()
    t0 = time.perf_counter()
    eng.step()  # the whole batch's prefill fits one step (budget >= batch * prompt_len)
    sync()
    t1 = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    sync()
    return t1 - t0, (time.perf_counter() - t1) / max(steps, 1)


def time_hf(model, prompts, gen: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kw)
        sync()
        return (time.perf_counter() - t - prefill) / (gen - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the HuggingFace baseline")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()

    import transformers

    from engine import LLM

    bw = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        weight_bytes = make_model_dir(args.shape, d)
        cfg = SHAPES[args.shape]
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
        max_b = max(args.batch)
        llm = LLM(d, dtype="bfloat16", device="cuda", max_num_seqs=max_b, gpu_memory_utilization=0.5,
                  max_num_batched_tokens=max(2048, max_b * args.prompt_len), max_model_len=4096)
        hf = None if args.no_hf else transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.bfloat16).cuda().eval()
        rng = random.Random(0)
        for b in args.batch:
            prompts = [[rng.randrange(3, 32000) for _ in range(args.prompt_len)] for _ in range(b)]
            time_ours(llm, prompts[:1], 4)  # warm-up
            prefill_s, step_s = time_ours(llm, prompts, args.gen)
            hf_step = time_hf(hf, prompts, args.gen) if hf is not None else float("nan")
            avg_ctx = args.prompt_len + args.gen / 2
            roof_step = (weight_bytes + b * avg_ctx * kv_per_token) / bw
            rows.append(dict(batch=b, ours_step_ms=step_s * 1e3, ours_tok_s=b / step_s,
                             ours_tok_s_per_seq=1 / step_s, hf_step_ms=hf_step * 1e3, hf_tok_s=b / hf_step,
                             roofline_step_ms=roof_step * 1e3, frac_of_roofline=roof_step / step_s,
                             speedup_vs_hf=hf_step / step_s, prefill_ms=prefill_s * 1e3))
    result = dict(shape=args.shape, device=torch.cuda.get_device_name(), copy_bandwidth_GBps=bw / 1e9,
                  weight_bytes=weight_bytes, prompt_len=args.prompt_len, gen=args.gen, rows=rows,
                  date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.shape} bf16 on {result['device']}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"weights {weight_bytes / 2**30:.2f} GiB, prompt {args.prompt_len}, gen {args.gen}")
    print(f"{'batch':>5} {'ours ms/step':>12} {'ours tok/s':>10} {'HF ms/step':>10} {'vs HF':>6} "
          f"{'roof ms':>8} {'of roof':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ours_step_ms']:>12.2f} {r['ours_tok_s']:>10.0f} {r['hf_step_ms']:>10.2f} "
              f"{r['speedup_vs_hf']:>5.2f}x {r['roofline_step_ms']:>8.3f} {r['frac_of_roofline']:>6.1%}")


if __name__ == "__main__":
    main()
