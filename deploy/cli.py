"""The `kvrelay` command: `serve` (start a deployment), `generate` (stream a completion), `bench` (load test).
Each subcommand imports only what it needs: `generate` and `bench` never import torch or Ray."""

from __future__ import annotations

import argparse
import os
import sys

SERVE_FLAGS: list[tuple[str, type, str]] = [
    ("model", str, "HuggingFace-format model directory (default: the embedded demo model)"),
    ("prefill-workers", int, "prefill workers, one GPU each (default 1; 0 = aggregated: decode groups prefill too)"),
    ("decode-groups", int, "decode groups (default 1)"),
    ("decode-tp", int, "tensor-parallel ranks (GPUs) per decode group (default 1)"),
    ("host", str, "router listen address (default 0.0.0.0)"),
    ("port", int, "router port (default 50051)"),
    ("address", str, "join this Ray cluster ('auto' or host:port) instead of starting a local one"),
    ("device", str, "auto | cpu | cuda (default auto: cuda when every rank can have a GPU)"),
    ("dtype", str, "auto | float32 | bfloat16 | float16 (default: the checkpoint's)"),
    ("load-format", str, "auto | dummy (random weights from config.json alone, for benchmarks)"),
    ("block-size", int, "tokens per KV block (default 16)"),
    ("max-model-len", int, "prompt + generated tokens at most (default: the model's, at most 8192)"),
    ("gpu-memory-utilization", float, "share of each GPU an engine may use (default 0.9)"),
    ("prefill-num-blocks", int, "KV blocks per prefill worker (default: sized from memory)"),
    ("decode-num-blocks", int, "KV blocks per decode group (default: sized from memory)"),
    ("max-num-seqs", int, "requests a decode group runs at once (default 256)"),
    ("max-num-batched-tokens", int, "prefill tokens per step; longer prompts are chunked (default 2048)"),
    ("max-queued-requests", int, "requests that may wait for KV room before RESOURCE_EXHAUSTED (default 512)"),
    ("queue-timeout-s", float, "how long a request may wait while no KV room frees up (default 120)"),
    ("transfer-timeout-s", float, "how long a prompt's KV may take to reach its decode group (default 60)"),
    ("routing-policy", str, "cache_aware | least_loaded | round_robin (default cache_aware)"),
    ("max-restarts", int, "restarts of a lost worker (a decode group restarts whole) before giving up (default 3)"),
    ("migration-limit", int, "re-placements per request: prefill retries and migrations off a lost decode group "
     "(default 3)"),
    ("startup-timeout-s", float, "how long workers may take to load (default 600)"),
    ("log-level", str, "debug | info | warning | error (default warning)"),
    ("async-scheduling", str, "auto | on | off: schedule step n+1 while step n runs (default auto: on with CUDA)"),
    ("http-port", int, "also serve the OpenAI-compatible HTTP API (and /health, /metrics) on this port"),
    ("api-key", str, "clients must send 'Authorization: Bearer KEY' (HTTP and gRPC); also $KVRELAY_API_KEY"),
    ("api-key-file", str, "read the API key from this file"),
    ("tls-cert", str, "PEM certificate: serve both APIs over TLS (with --tls-key)"),
    ("tls-key", str, "PEM private key of --tls-cert"),
    ("served-model-name", str, "the model's name in the OpenAI API (default: the model directory's name)"),
    ("chat-template", str, "Jinja chat template file (default: the model's own)"),
    ("max-prompt-chars", int, "text prompts longer than this are refused before tokenizing (default: the most "
     "characters the allowed prompt tokens can spell)"),
]


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a kvrelay deployment on Ray and serve it over gRPC",
                       description="Start prefill workers and decode groups as Ray actors, run the router, and "
                                   "serve until Ctrl-C. Settings come from --config (YAML or JSON, keys as the "
                                   "flags) and then the flags.")
    p.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    for flag, typ, text in SERVE_FLAGS:
        p.add_argument(f"--{flag}", type=typ, default=None, help=text)
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--no-decode-kernel", action="store_true", help="portable torch decode attention on CUDA")
    p.add_argument("--no-fused-ops", action="store_true", help="no fused Triton norm/rotary/SiLU kernels on CUDA")
    p.add_argument("--no-engine-process", action="store_true",
                   help="run each worker's engine on a thread of its service's process, not a process of its own")


def _serve(args: argparse.Namespace) -> int:
    from deploy.config import ServeConfig
    from deploy.serve import serve

    try:
        kwargs = ServeConfig.from_file(args.config) if args.config else {}
        for flag, _, _ in SERVE_FLAGS:
            value = getattr(args, flag.replace("-", "_"))
            if value is not None:
                kwargs[flag.replace("-", "_")] = value
        if args.no_prefix_caching:
            kwargs["enable_prefix_caching"] = False
        for flag, key, value in (("enforce_eager", "enforce_eager", True), ("no_decode_kernel", "decode_kernel", False),
                                 ("no_fused_ops", "fused_ops", False), ("no_engine_process", "engine_process", False)):
            if getattr(args, flag):
                kwargs[key] = value
        if "api_key" not in kwargs and "api_key_file" not in kwargs and os.environ.get("KVRELAY_API_KEY"):
            kwargs["api_key"] = os.environ["KVRELAY_API_KEY"]
        cfg = ServeConfig(**kwargs)
    except (OSError, ValueError, TypeError) as e:
        print(f"kvrelay serve: {e}", file=sys.stderr)
        return 2
    return serve(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kvrelay", description="kvrelay: disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    gen = sub.add_parser("generate", help="stream a completion from a running kvrelay")
    from client.cli import add_arguments

    add_arguments(gen)
    sub.add_parser("bench", help="load-test a running kvrelay (see `kvrelay bench --help`)", add_help=False)
    if argv and argv[0] == "bench":  # its own parser owns every flag after the subcommand
        from bench.load.cli import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    from client.cli import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
