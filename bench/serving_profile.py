"""Where the served stack spends its CPU: the same closed-loop load as `bench.serving_overhead`, through
`kvrelay serve --prefill-workers 0`, while each process of the stack is sampled: its CPU use (one core = 100%)
and, when py-spy is installed, a profile of its Python stacks (py-spy's raw/collapsed format, one file per
process under --out-dir, and the top functions by own samples printed last).

    python -m bench.serving_profile --shape llama-3.2-1b --concurrency 256 --requests 2048 --out-dir results/prof

A process at ~100% is the stack's ceiling: the router (the `kvrelay serve` process), the decode group's service
process (its Ray actor), its engine core, or the load generator.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.bench_models import write_config
from bench.disagg_vs_agg import Server, free_port
from bench.serving_overhead import serve_flags

ROLES = (("engine_core_proc", "engine core"), ("DecodeRankActor", "decode service"), ("deploy.cli", "router"),
         ("bench.load", "load generator"))


def processes() -> dict[int, str]:
    """pid -> role of the stack's processes (by command line)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = next((r for key, r in ROLES if key in cmd), None)
        if role is not None and "serving_profile" not in cmd:
            found[int(pid)] = role
    return found


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def top_functions(raw: str, n: int) -> list[tuple[str, float]]:
    """The functions with the most own samples in a py-spy raw profile, with their share of all samples."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        own[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(f, c / total) for f, c in own.most_common(n)] if total else []


GAUGES = ("kvrelay:num_requests_running", "kvrelay:num_requests_waiting", "kvrelay:kv_cache_usage_perc")


def scrape(url: str) -> dict[str, float]:
    """The decode group's running / waiting requests and KV use, from the router's /metrics (as its last load
    poll saw them)."""
    found = {}
    with urllib.request.urlopen(url, timeout=2) as r:
        for line in r.read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in GAUGES:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--profile-s", type=float, default=8.0, help="seconds of samples, from 5 s into the load")
    p.add_argument("--serve-args", default="", help="more `kvrelay serve` flags (e.g. --no-engine-process)")
    p.add_argument("--out-dir", default="results/serving_profile")
    args = p.parse_args(argv)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    os.makedirs(args.out_dir, exist_ok=True)
    import importlib.util

    # The router's gauges come from its HTTP /metrics, which needs FastAPI (absent: no gauges, the rest runs).
    http_port = free_port() if importlib.util.find_spec("fastapi") is not None else None
    samples: list[dict[str, float]] = []
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        os.makedirs(model)
        write_config(model, args.shape, dtype)
        serve = [*serve_flags(model, args, dtype, args.concurrency),
                 *(["--http-port", str(http_port)] if http_port else []), *args.serve_args.split()]
        with Server(serve, os.path.join(tmp, "serve.log"), 900) as target:
            load = subprocess.Popen([sys.executable, "-m", "bench.load", "--target", target, "--concurrency",
                                     str(args.concurrency), "--num-requests", str(args.requests), "--input-len",
                                     str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
                                     "--seed", "0", "--quiet", "--out", os.path.join(tmp, "load.json")],
                                    stdout=subprocess.DEVNULL)
            time.sleep(5.0)
            procs = processes()
            before = {pid: cpu_seconds(pid) for pid in procs}
            spies = [(pid, subprocess.Popen([spy, "record", "--nonblocking", "--format", "raw", "-r", "200", "-d",
                                             str(int(args.profile_s)), "-p", str(pid), "-o",
                                             os.path.join(args.out_dir, f"{procs[pid].replace(' ', '_')}-{pid}.txt")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                     for pid in procs] if spy else []
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.profile_s:
                if http_port:
                    samples.append(scrape(f"http://127.0.0.1:{http_port}/metrics"))
                time.sleep(0.25)
            usage = {pid: (cpu_seconds(pid) - before[pid]) / (time.monotonic() - t0) for pid in procs
                     if os.path.exists(f"/proc/{pid}")}
            for _, s in spies:
                s.wait(60)
            load.wait(1800)
    print(f"\n{args.shape} on {args.device}, {args.concurrency} in flight: CPU per process over {args.profile_s} s")
    for pid, role in sorted(procs.items(), key=lambda kv: kv[1]):
        print(f"{role:>15} {pid:>8} {100 * usage.get(pid, 0.0):>6.0f}%")
        path = os.path.join(args.out_dir, f"{role.replace(' ', '_')}-{pid}.txt")
        if os.path.exists(path):
            with open(path) as f:
                for fn, share in top_functions(f.read(), 8):
                    print(f"{'':>24}{100 * share:5.1f}%  {fn[:110]}")
    for name in GAUGES:
        v = [x[name] for x in samples if name in x]
        if v:
            print(f"{name:>34}: mean {sum(v) / len(v):8.2f}  min {min(v):8.2f}  max {max(v):8.2f}  ({len(v)} polls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
