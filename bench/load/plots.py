"""`--plot DIR`: PNG figures from a results document (so a saved results.json can be re-plotted too).

latency_cdf.png: empirical CDFs of TTFT, TPOT, ITL and E2E latency; throughput.png: output tokens/s and completed
requests/s over time; with --sweep, sweep.png: attainment and goodput against the offered rate (the CDFs and
throughput are then the best point's). matplotlib is imported only here, so the rest works without it.
"""

from __future__ import annotations

import os
from typing import Any

_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "Inter-token latency"), ("e2e_ms", "E2E latency"))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or drop --plot)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - reached as plt.matplotlib.ticker

    return plt


def write_plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """Write the figures for `doc` (from report.result_json) into out_dir; return their paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    run = doc
    if "sweep" in doc:
        paths.append(_sweep(plt, doc["sweep"], out_dir))
        best = [p for p in doc["sweep"]["points"] if p["rate"] == doc["sweep"]["best_rate"]]
        if not best:
            return paths
        run = best[0]
    paths.append(_cdfs(plt, run["requests"], out_dir))
    paths.append(_throughput(plt, run["timeline"], out_dir))
    return paths


def _cdfs(plt: Any, requests: list[dict[str, Any]], out_dir: str) -> str:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ok = [r for r in requests if r["ok"]]
    for ax, (key, title) in zip(axes.flat, _LATENCIES):
        vals = sorted(v for r in ok for v in (r[key] if key == "itl_ms" else [r[key]]) if v is not None)
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post")
        ax.set(title=f"{title} ({len(vals)} samples)", xlabel="ms", ylabel="fraction <= x", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle("kvrelay bench: latency CDFs")
    fig.tight_layout()
    return _save(plt, fig, out_dir, "latency_cdf.png")


def _steps(tl: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """Bin edges and values for a step plot that also draws the last bin (steps-post ends at its last point)."""
    return tl["t_s"] + [len(tl["t_s"]) * tl["bin_s"]], tl[key] + tl[key][-1:]


def _throughput(plt: Any, tl: dict[str, Any], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(*_steps(tl, "output_tokens_per_s"), drawstyle="steps-post", label="output tokens/s")
    ax.set(xlabel=f"time since start (s), {tl['bin_s']:.3g} s bins", ylabel="output tokens/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(*_steps(tl, "completed_per_s"), drawstyle="steps-post", color="tab:orange", label="completed req/s")
    if any(tl["failed_per_s"]):
        ax2.plot(*_steps(tl, "failed_per_s"), drawstyle="steps-post", color="tab:red", label="failed req/s")
    ax2.set(ylabel="requests/s")
    ax2.set_ylim(bottom=0)
    fig.legend(loc="lower center", ncol=3)
    fig.subplots_adjust(bottom=0.22)
    ax.grid(alpha=0.3)
    ax.set_title("kvrelay bench: throughput over time")
    return _save(plt, fig, out_dir, "throughput.png")


def _sweep(plt: Any, sweep: dict[str, Any], out_dir: str) -> str:
    pts = sorted(sweep["points"], key=lambda p: p["rate"])
    rates = [p["rate"] for p in pts]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(rates, [p["metrics"]["slo_attainment"] for p in pts], "o-", label="SLO attainment")
    ax.axhline(sweep["attainment"], color="gray", linestyle="--", label="target")
    ax.set(xscale="log", xlabel="offered rate (req/s)", ylabel="attainment", ylim=(0, 1.05))
    ax.set_xticks(rates, [f"{r:.3g}" for r in rates])  # the rates measured, as plain numbers
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax2 = ax.twinx()
    ax2.plot(rates, [p["metrics"]["goodput"] for p in pts], "s-", color="tab:green", label="goodput (req/s)")
    ax2.set(ylabel="goodput (req/s)")
    ax2.set_ylim(bottom=0)
    if sweep["best_rate"] is not None:
        ax.axvline(sweep["best_rate"], color="tab:green", alpha=0.4)
    ax.set_title("kvrelay bench --sweep")
    fig.tight_layout()
    fig.legend(loc="lower center", ncol=3)
    fig.subplots_adjust(bottom=0.25)
    return _save(plt, fig, out_dir, "sweep.png")


def _save(plt: Any, fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
