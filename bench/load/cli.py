"""`kvrelay bench` (also `python -m bench.load`): load-test a running kvrelay endpoint. The only place flags are
parsed; everything else takes the frozen configs built here."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from bench.load.config import (
    DEFAULT_OUTPUT_LEN,
    SLO,
    BenchConfig,
    LoadConfig,
    SamplingConfig,
    SweepConfig,
    WorkloadConfig,
)
from bench.load.lengths import LengthDist

DESCRIPTION = ("Load-test a running kvrelay endpoint through the client SDK: TTFT, TPOT, inter-token and end-to-end "
               "latency, throughput, prefix-cache hit rate and goodput under SLOs; errors counted by status. "
               "Definitions: docs/load-testing.md.")
EXAMPLES = """examples:
  kvrelay bench --rate 4 --num-requests 200 --input-len 512 --input-len-range 0.25 --output-len 128 --ignore-eos
  kvrelay bench --concurrency 16 --duration 60 --num-prefixes 8 --questions-per-prefix 32 --prefix-len 1024
  kvrelay bench --rate 2 --dataset ShareGPT_V3.json --tokenizer path/to/model --out results.json --plot plots/
  kvrelay bench --sweep --slo-ttft-ms 500 --slo-tpot-ms 50 --attainment 0.9 --num-requests 100 --ignore-eos
  kvrelay bench --concurrency 256 --processes 4 --num-requests 2048 --output-len 128 --ignore-eos
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay bench", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", metavar="HOST:PORT", default="localhost:50051", help="the kvrelay endpoint, host:port")
    p.add_argument("--backend", choices=("kvrelay", "openai"), default="kvrelay",
                   help="kvrelay: its gRPC API at --target; openai: any OpenAI-compatible server at --base-url")
    p.add_argument("--base-url", metavar="URL", help="--backend openai: e.g. http://localhost:8000/v1")
    p.add_argument("--model", metavar="NAME", help="--backend openai: the model to ask for (default: the first)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("KVRELAY_API_KEY"),
                   help="the server's API key (default $KVRELAY_API_KEY)")
    g = p.add_argument_group("load (open loop: --rate; closed loop: --concurrency)")
    g.add_argument("--rate", type=float, metavar="R",
                   help="open loop: requests per second (inf = all at once); with --sweep, the first rate tried "
                   "(default 1)")
    g.add_argument("--burstiness", type=float, metavar="B", default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, < 1 burstier, > 1 more regular")
    g.add_argument("--concurrency", type=int, metavar="N",
                   help="closed loop: requests kept in flight (with --rate: a cap)")
    g.add_argument("--num-requests", type=int, metavar="N",
                   help="measured requests (default 100; shared-prefix: N x M)")
    g.add_argument("--duration", type=float, metavar="S", help="stop sending after this many seconds")
    g.add_argument("--warmup", type=int, metavar="N", default=0, help="unmeasured requests sent first")
    g.add_argument("--timeout", type=float, metavar="S", help="per-request deadline in seconds")
    g.add_argument("--processes", type=int, metavar="N", default=1,
                   help="split the load over N client processes, merged into one report (when one client "
                   "process's CPU is the ceiling, e.g. hundreds of streams)")
    g = p.add_argument_group("workload (random by default; shared-prefix with --num-prefixes; "
                             "ShareGPT with --dataset)")
    g.add_argument("--input-len", type=int, metavar="N", default=128, help="prompt (shared-prefix: question) tokens")
    g.add_argument("--input-len-range", type=float, metavar="R", default=0.0, help="uniform in len*(1 +- R)")
    g.add_argument("--input-len-std", type=float, metavar="S", default=0.0, help="normal with this std")
    g.add_argument("--output-len", type=int, metavar="N", help=f"max tokens to generate (default {DEFAULT_OUTPUT_LEN}; "
                   "ShareGPT: each answer's length)")
    g.add_argument("--output-len-range", type=float, metavar="R", default=0.0, help="uniform in len*(1 +- R)")
    g.add_argument("--output-len-std", type=float, metavar="S", default=0.0, help="normal with this std")
    g.add_argument("--num-prefixes", type=int, metavar="N", help="shared-prefix: number of system prompts")
    g.add_argument("--questions-per-prefix", type=int, metavar="M",
                   help="shared-prefix: questions per system prompt (default 8)")
    g.add_argument("--prefix-len", type=int, metavar="L", help="shared-prefix: system prompt tokens (default 256)")
    g.add_argument("--dataset", metavar="FILE",
                   help="ShareGPT-format JSON file (text prompts: the model needs a tokenizer)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="the served model's tokenizer.json (or its directory) to count ShareGPT answer tokens")
    g.add_argument("--seed", type=int, metavar="N", default=0, help="makes prompts, lengths and arrivals reproducible")
    g = p.add_argument_group("sampling")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    g.add_argument("--temperature", type=float, metavar="T", default=0.0, help="0 = greedy (default)")
    g = p.add_argument_group("SLOs and goodput (a request is good when every bound given holds)")
    g.add_argument("--slo-ttft-ms", type=float, metavar="MS", help="time to first token bound")
    g.add_argument("--slo-tpot-ms", type=float, metavar="MS", help="time per output token bound")
    g = p.add_argument_group("rate sweep")
    g.add_argument("--sweep", action="store_true", help="find the highest rate meeting the SLOs at --attainment")
    g.add_argument("--attainment", type=float, metavar="A", default=0.9,
                   help="fraction of requests that must meet the SLOs")
    g.add_argument("--sweep-tolerance", type=float, metavar="T", default=0.1,
                   help="stop when the bracket is this tight (relative)")
    g.add_argument("--sweep-max-points", type=int, metavar="K", default=12, help="at most this many runs")
    g.add_argument("--sweep-max-rate", type=float, metavar="R", default=10000.0, help="never try a higher rate")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE",
                   help="write full results (config, metrics, per-request records, errors) as JSON here")
    g.add_argument("--plot", metavar="DIR", help="write latency CDFs and throughput over time as PNG (matplotlib)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    return p


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    """Flags -> validated config (ValueError with what to fix)."""
    if a.dataset is not None:
        kind = "sharegpt"
    elif a.num_prefixes is not None:
        kind = "shared-prefix"
    else:
        kind = "random"
    shared = kind == "shared-prefix"
    given_output = a.output_len is not None or a.output_len_range or a.output_len_std
    workload = WorkloadConfig(
        kind=kind, input_len=LengthDist(a.input_len, a.input_len_range, a.input_len_std),
        output_len=LengthDist(a.output_len or DEFAULT_OUTPUT_LEN, a.output_len_range, a.output_len_std)
        if given_output else None,
        num_prefixes=a.num_prefixes or 0,
        questions_per_prefix=a.questions_per_prefix or (8 if shared else 0),
        prefix_len=a.prefix_len or (256 if shared else 0), dataset=a.dataset, tokenizer=a.tokenizer, seed=a.seed)
    sweep = None
    rate = a.rate
    if a.sweep:
        rate = rate or 1.0
        sweep = SweepConfig(attainment=a.attainment, start_rate=rate, tolerance=a.sweep_tolerance,
                            max_points=a.sweep_max_points, min_rate=min(0.01, rate), max_rate=a.sweep_max_rate)
    num_requests = a.num_requests
    if num_requests is None and a.duration is None:
        num_requests = workload.default_num_requests
    load = LoadConfig(rate=rate, burstiness=a.burstiness, concurrency=a.concurrency, num_requests=num_requests,
                      duration=a.duration, warmup=a.warmup, processes=a.processes)
    return BenchConfig(target=a.target, workload=workload, load=load,
                       sampling=SamplingConfig(ignore_eos=a.ignore_eos, temperature=a.temperature),
                       slo=SLO(a.slo_ttft_ms, a.slo_tpot_ms), sweep=sweep, timeout=a.timeout, out=a.out,
                       plot_dir=a.plot, quiet=a.quiet, backend=a.backend, base_url=a.base_url, model=a.model,
                       api_key=a.api_key)


async def _run(cfg: BenchConfig) -> int:
    from bench.load.command import run_bench
    from bench.load.connect import open_client

    async with open_client(cfg) as client:
        outcome = await run_bench(cfg, client)
    print(outcome.table, flush=True)
    # Failed requests are reported, not fatal; a run where none succeeded measured nothing, which is.
    return 0 if outcome.completed else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # exits 2 with the usage line
    try:
        return asyncio.run(_run(cfg))
    except KeyboardInterrupt:
        print("kvrelay bench: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:  # a workload that does not fit the model, --plot without matplotlib
        print(f"kvrelay bench: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. KvrelayError from model_info: the endpoint is not there
        if not hasattr(e, "code"):
            raise
        print(f"kvrelay bench: cannot use {cfg.endpoint}: {e}", file=sys.stderr)
        return 1
