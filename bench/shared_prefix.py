"""The shared-prefix, long-generation scenario under decode memory pressure, on one machine (no Ray).

    python -m bench.shared_prefix                      # 60 requests, 600-token system prompt, 380 generated
    python -m bench.shared_prefix --requests 16 --gen 64 --check --out r.json     # the CI test's size

A prefill worker and a decode group with a small KV pool (`--decode-num-blocks`, default 64 blocks of 16) behind the
router; all requests at once, each the same system prompt plus a few tokens of its own, greedy, EOS ignored. Reports
how many requests the decode group ran at once at the peak, statuses, time, the decode group's preemptions and
prefix-cache hit rate, and whether its blocks all came back; `--check` also compares every completion with
single-process `LLM` greedy output. Decode-side prefix sharing is what lets many requests hold one copy of the
system prompt's KV; without it each reserved a private copy (600 tokens = 38 of the 64 blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

SECRET = "bench-shared-prefix"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded demo model)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--system-len", type=int, default=600)
    ap.add_argument("--own-len", type=int, default=10)
    ap.add_argument("--gen", type=int, default=380)
    ap.add_argument("--decode-num-blocks", type=int, default=64)
    ap.add_argument("--prefill-num-blocks", type=int, default=256)
    ap.add_argument("--queue-timeout-s", type=float, default=120.0)
    ap.add_argument("--check", action="store_true", help="compare every completion with LLM greedy output")
    ap.add_argument("--out", default="bench/results/shared_prefix.json")
    args = ap.parse_args()

    from client import Client, KvrelayError
    from decode_workers.group import DecodeLeader
    from deploy import DEFAULT_MODEL_DIR
    from engine import LLM, EngineConfig, SamplingParams
    from prefill_workers.worker import PrefillWorker
    from router.config import RouterConfig
    from router.server import RouterServer
    from router.workers import WorkerSpec

    model = args.model or DEFAULT_MODEL_DIR
    rng = random.Random(0)
    max_len = args.system_len + args.own_len + args.gen + 16
    pcfg = EngineConfig.from_model_dir(model, dtype="float32", num_blocks=args.prefill_num_blocks,
                                       max_model_len=max_len)
    dcfg = EngineConfig.from_model_dir(model, dtype="float32", num_blocks=args.decode_num_blocks,
                                       max_model_len=max_len)
    vocab = pcfg.model.vocab_size
    system = [rng.randrange(3, vocab) for _ in range(args.system_len)]
    prompts = [system + [rng.randrange(3, vocab) for _ in range(args.own_len)] for _ in range(args.requests)]
    prefill, decode = PrefillWorker("p0", pcfg, secret=SECRET), DecodeLeader("d0", dcfg, secret=SECRET)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=0, queue_timeout_s=args.queue_timeout_s,
                                       max_queued_requests=args.requests, stats_log_interval_s=0), pcfg.model,
                          [WorkerSpec("p0", prefill.address)], [WorkerSpec("d0", decode.address)], secret=SECRET)
    port = asyncio.run_coroutine_threadsafe(router.start(max_len, 60), loop).result(120)
    peak, done = [0], threading.Event()

    def watch() -> None:  # the decode group's running requests, sampled from its engine loop's published stats
        while not done.is_set():
            peak[0] = max(peak[0], decode.loop.stats.running)
            time.sleep(0.002)

    def one(prompt: list[int]) -> list[int] | str:
        with Client(f"127.0.0.1:{port}", timeout=args.queue_timeout_s + 600) as c:
            try:
                return c.generate(prompt, max_tokens=args.gen, temperature=0, ignore_eos=True).token_ids
            except KvrelayError as e:
                return e.code

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as ex:
        results = list(ex.map(one, prompts))
    elapsed = time.perf_counter() - t0
    done.set()
    deadline = time.monotonic() + 10
    while decode.loop.stats.free_blocks != decode.loop.stats.num_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = decode.loop.stats
    statuses: dict[str, int] = {}
    for r in results:
        key = "OK" if isinstance(r, list) else r
        statuses[key] = statuses.get(key, 0) + 1
    row = dict(requests=args.requests, system_len=args.system_len, own_len=args.own_len, gen=args.gen,
               decode_num_blocks=args.decode_num_blocks, seconds=elapsed, peak_running=peak[0], statuses=statuses,
               decode_preemptions=stats.num_preemptions,
               decode_prefix_hit_rate=stats.prefix_cache_hit_rate,
               decode_blocks_back=stats.free_blocks == stats.num_blocks, date=time.strftime("%Y-%m-%d"))
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    prefill.stop()
    decode.stop()
    if args.check:
        ref = LLM(model, dtype="float32", max_model_len=max_len).generate(
            prompts, SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True))
        row["equal_to_llm"] = sum(r == o.token_ids for r, o in zip(results, ref))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(f"\nshared prefix: {args.requests} requests, {args.system_len} shared + {args.own_len} own tokens, "
          f"{args.gen} generated, decode pool {args.decode_num_blocks} blocks")
    print(f"{'seconds':>8} {'peak running':>12} {'statuses':>24} {'preemptions':>11} {'decode hit rate':>15} "
          f"{'blocks back':>11}" + (f" {'= LLM':>6}" if args.check else ""))
    print(f"{elapsed:>8.1f} {peak[0]:>12} {json.dumps(statuses):>24} {row['decode_preemptions']:>11} "
          f"{row['decode_prefix_hit_rate']:>15.3f} {str(row['decode_blocks_back']):>11}"
          + (f" {row['equal_to_llm']:>6}" if args.check else ""))


if __name__ == "__main__":
    main()
    # The workers ran in this process: their KV receiver threads may still sit in a gloo receive, which closing
    # a channel does not interrupt (torch 2.13), and tearing the interpreter down under them can abort it. Every
    # result is written and every worker stopped by now, so leave without that teardown.
    sys.stdout.flush()
    os._exit(0)
