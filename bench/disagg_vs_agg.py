"""Disaggregated vs aggregated serving on the same GPUs, behind the same router: the highest request rate each
sustains while 90% of requests meet a DistServe-style SLO (time to first token and time per output token), for a
chat-like and a long-prompt workload.

    python -m bench.disagg_vs_agg --shape llama-3.1-8b --out results/disagg.json          # needs 2 GPUs

On 2 GPUs: disaggregated = 1 prefill worker + 1 decode group (TP 1); aggregated = 2 decode groups that prefill
and decode (`--prefill-workers 0`), so both use the same two GPUs. Each mode is a real `kvrelay serve` (random
weights of the model's shape, bf16) measured by `kvrelay bench --sweep` through the client SDK; the table printed
last gives, per workload, each mode's best rate and goodput and their ratio. `--device cpu --shape tiny --quick`
is a CPU dry run (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from bench.bench_models import write_config


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    input_range: float
    output_len: int
    output_range: float
    slo_ttft_ms: float
    slo_tpot_ms: float


# DistServe's chatbot and summarization settings, scaled to an 8B model on one H100/H200 per worker.
WORKLOADS = {
    "chat": Workload("chat", 512, 0.5, 256, 0.5, slo_ttft_ms=500, slo_tpot_ms=60),
    "long": Workload("long", 4096, 0.1, 128, 0.25, slo_ttft_ms=4000, slo_tpot_ms=60),
}
QUICK = {"chat": Workload("chat", 32, 0.5, 12, 0.5, 3000, 1000),
         "long": Workload("long", 160, 0.1, 6, 0.25, 5000, 1000)}
MODES = {"disaggregated": dict(prefill_workers=1, decode_groups=1),
         "aggregated": dict(prefill_workers=0, decode_groups=2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kvrelay serve` subprocess; a context manager that waits until it serves and stops it with SIGINT."""

    def __init__(self, args: list[str], log_path: str, timeout_s: float) -> None:
        self.port = free_port()
        self.log_path, self.timeout_s = log_path, timeout_s
        self.cmd = [sys.executable, "-m", "deploy.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    *args]

    def __enter__(self) -> str:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while "is serving" not in open(self.log_path).read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"kvrelay serve did not come up:\n{open(self.log_path).read()[-3000:]}")
            time.sleep(0.5)
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def sweep(target: str, w: Workload, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, "-m", "bench.load", "--target", target, "--sweep", "--rate", str(args.start_rate),
           "--input-len", str(w.input_len), "--input-len-range", str(w.input_range),
           "--output-len", str(w.output_len), "--output-len-range", str(w.output_range), "--ignore-eos",
           "--slo-ttft-ms", str(w.slo_ttft_ms), "--slo-tpot-ms", str(w.slo_tpot_ms), "--attainment",
           str(args.attainment), "--sweep-max-points", str(args.max_points), "--warmup", "2", "--quiet",
           "--seed", "0", "--out", out]
    cmd += ["--duration", str(args.duration)] if args.duration else ["--num-requests", str(args.num_requests)]
    subprocess.run(cmd, check=True, timeout=args.point_timeout_s * (args.max_points + 1), stdout=subprocess.DEVNULL)
    with open(out) as f:
        res = json.load(f)["sweep"]
    best = next((p for p in res["points"] if p["rate"] == res["best_rate"]), None)
    m = best["metrics"] if best else {}
    return {"best_rate": res["best_rate"], "lowest_missed_rate": res["lowest_missed_rate"],
            "goodput": m.get("goodput"), "request_throughput": m.get("request_throughput"),
            "ttft_p90_ms": (m.get("ttft_ms") or {}).get("p90"), "tpot_p90_ms": (m.get("tpot_ms") or {}).get("p90"),
            "points": [{"rate": p["rate"], "met": p["met"], "goodput": p["metrics"]["goodput"]}
                       for p in res["points"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--quick", action="store_true", help="tiny lengths and few requests (CPU dry run)")
    p.add_argument("--start-rate", type=float, default=1.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--max-points", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per sweep point (0: --num-requests)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--point-timeout-s", type=float, default=600.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    workloads = QUICK if args.quick else WORKLOADS
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "model"))
        model = write_config(os.path.join(tmp, "model"), args.shape, dtype)
        for mode, shape_args in MODES.items():
            serve = ["--model", model, "--load-format", "dummy", "--dtype", dtype, "--device", args.device,
                     "--prefill-workers", str(shape_args["prefill_workers"]), "--decode-groups",
                     str(shape_args["decode_groups"]), "--max-model-len", str(8192 if not args.quick else 512)]
            if args.device == "cpu":
                serve += ["--prefill-num-blocks", "256", "--decode-num-blocks", "256"]
            with Server(serve, os.path.join(tmp, f"{mode}.log"), args.point_timeout_s) as target:
                for name in args.workloads:
                    res = sweep(target, workloads[name], args, os.path.join(tmp, f"{mode}-{name}.json"))
                    rows.append({"mode": mode, "workload": asdict(workloads[name]), **res})
    report = {"shape": args.shape, "device": args.device, "attainment": args.attainment, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\n{args.shape} on {args.device}: highest rate with {args.attainment:.0%} of requests within the SLO")
    print(f"{'workload':<9} {'mode':<14} {'best req/s':>10} {'goodput':>8} {'TTFT p90':>9} {'TPOT p90':>9} "
          f"{'vs aggregated':>13}")
    for name in args.workloads:
        agg = next(r for r in rows if r["workload"]["name"] == name and r["mode"] == "aggregated")
        for r in (x for x in rows if x["workload"]["name"] == name):
            ratio = (r["best_rate"] / agg["best_rate"]) if r["best_rate"] and agg["best_rate"] else float("nan")
            print(f"{name:<9} {r['mode']:<14} {r['best_rate'] or 0:>10.2f} {r['goodput'] or 0:>8.2f} "
                  f"{r['ttft_p90_ms'] or 0:>8.0f}ms {r['tpot_p90_ms'] or 0:>7.1f}ms {ratio:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
