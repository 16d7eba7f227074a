"""The results: a short table for the terminal and the full JSON document (config, metrics, errors by code,
per-request records, throughput over time, sweep points)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from bench.load.config import SLO, BenchConfig, LoadConfig
from bench.load.metrics import Metrics, timeline
from bench.load.runner import RunResult
from bench.load.sweep import SweepResult

SCHEMA = "kvrelay-bench/1"  # bump when a field changes meaning


def run_json(metrics: Metrics, run: RunResult) -> dict[str, Any]:
    """One run's metrics, records and timeline."""
    return {"metrics": metrics.to_json(), "errors": metrics.errors,
            "timeline": timeline(run.records, run.duration_s),
            "warmup": {"requests": len(run.warmup), "failed": sum(not r.ok for r in run.warmup)},
            "requests": [r.to_json() for r in run.records]}


def result_json(cfg: BenchConfig, model: dict[str, Any], workload: dict[str, Any], body: dict[str, Any]) -> dict:
    """The whole document: what was run against what, then `body` (run_json or sweep_json)."""
    return {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_json(),
            "model": model, "workload": workload, **body}


def sweep_json(sweep: SweepResult) -> dict[str, Any]:
    return {"sweep": {"attainment": sweep.attainment, "best_rate": sweep.best_rate,
                      "lowest_missed_rate": sweep.lowest_missed_rate, "capped": sweep.capped,
                      "points": [{"rate": p.rate, "met": p.met, **run_json(p.metrics, p.run)}
                                 for p in sweep.points]}}


def write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(doc), f, indent=1, allow_nan=False)
        f.write("\n")


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as strings rather than emit invalid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def describe_load(load: LoadConfig) -> str:
    if load.rate is None:
        s = f"closed loop, concurrency {load.concurrency}"
    else:
        dist = "Poisson" if load.burstiness == 1.0 else f"gamma, burstiness {load.burstiness:g}"
        s = f"open loop, {load.rate:g} req/s ({dist})"
        s += f", at most {load.concurrency} in flight" if load.concurrency else ""
    return s + (f", {load.processes} client processes" if load.processes > 1 else "")


def describe_slo(slo: SLO) -> str:
    parts = [f"TTFT <= {slo.ttft_ms:g} ms"] if slo.ttft_ms is not None else []
    parts += [f"TPOT <= {slo.tpot_ms:g} ms"] if slo.tpot_ms is not None else []
    return ", ".join(parts) or "none given"


def _row(name: str, value: object) -> str:
    return f"{name:<34}{value}"


def format_table(cfg: BenchConfig, metrics: Metrics, model_name: str) -> str:
    m = metrics
    errors = ", ".join(f"{code} {n}" for code, n in m.errors.items()) or "none"
    hit = "n/a" if m.prefix_cache_hit_rate is None else f"{100 * m.prefix_cache_hit_rate:.1f}%"
    lines = [f"{' kvrelay bench ':=^70}",
             _row("Target", f"{cfg.endpoint} ({model_name})"),
             _row("Load", describe_load(cfg.load)),
             _row("Requests completed / sent", f"{m.completed} / {m.requested}"),
             _row("Errors by code", errors),
             _row("Duration (s)", f"{m.duration_s:.2f}"),
             _row("Request throughput (req/s)", f"{m.request_throughput:.2f}"),
             _row("Goodput (req/s)", f"{m.goodput:.2f}  (SLO {describe_slo(cfg.slo)}; "
                                     f"attainment {100 * m.slo_attainment:.1f}%)"),
             _row("Output token throughput (tok/s)", f"{m.output_throughput:.1f}"),
             _row("Total token throughput (tok/s)", f"{m.total_token_throughput:.1f}"),
             _row("Prompt / output tokens", f"{m.total_prompt_tokens} / {m.total_output_tokens}"),
             _row("Prefix cache hit rate", hit),
             f"{'':-^70}",
             f"{'Latency (ms)':<14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}"]
    for name, s in (("TTFT", m.ttft_ms), ("TPOT", m.tpot_ms), ("ITL", m.itl_ms), ("E2E", m.e2e_ms)):
        cells = [s.mean, s.p50, s.p90, s.p99, s.max] if s is not None else []
        lines.append(f"{name:<14}" + ("".join(f"{v:>11.2f}" for v in cells) if cells else f"{'n/a':>11}"))
    lines.append("=" * 70)
    return "\n".join(lines)


def format_sweep_table(cfg: BenchConfig, sweep: SweepResult) -> str:
    lines = [f"{' kvrelay bench --sweep ':=^78}",
             f"SLO {describe_slo(cfg.slo)}; target attainment {100 * sweep.attainment:.0f}%",
             f"{'rate (req/s)':>12}{'attained':>10}{'goodput':>10}{'achieved':>10}{'errors':>8}"
             f"{'TTFT p99':>11}{'TPOT p99':>11}  met"]
    for p in sorted(sweep.points, key=lambda p: p.rate):
        m = p.metrics
        ttft = f"{m.ttft_ms.p99:.1f}" if m.ttft_ms else "n/a"
        tpot = f"{m.tpot_ms.p99:.1f}" if m.tpot_ms else "n/a"
        lines.append(f"{p.rate:>12.4g}{100 * m.slo_attainment:>9.1f}%{m.goodput:>10.2f}{m.request_throughput:>10.2f}"
                     f"{m.failed:>8}{ttft:>11}{tpot:>11}  {'yes' if p.met else 'no'}")
    if sweep.best_rate is None:
        answer = f"none: even {min(p.rate for p in sweep.points):.4g} req/s missed the target"
    elif sweep.lowest_missed_rate is None:
        answer = (f"{sweep.best_rate:.4g} req/s or more: no rate tried missed the target"
                  + (" (stopped at the sweep's max rate)" if sweep.capped else " (raise --sweep-max-points)"))
    else:
        answer = f"{sweep.best_rate:.4g} req/s ({sweep.lowest_missed_rate:.4g} req/s missed)"
    lines += ["achieved: completed req/s. Far below the rate: saturated, or points too short for queues to build",
              "(make each point longer with --duration or --num-requests).",
              f"Highest rate meeting the target: {answer}", "=" * 78]
    return "\n".join(lines)
