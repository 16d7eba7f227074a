"""What `kvrelay bench` does once its flags are parsed: connect, build the workload for the served model, run (or
sweep), then write the JSON and plots and return the table."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from bench.load.config import BenchConfig
from bench.load.connect import MODEL_INFO_TIMEOUT_S
from bench.load.metrics import compute_metrics
from bench.load.processes import drive
from bench.load.report import format_sweep_table, format_table, result_json, run_json, sweep_json, write_json
from bench.load.runner import RunOptions
from bench.load.sweep import run_sweep
from bench.load.workloads import ModelLimits, build_workload


@dataclass
class Outcome:
    doc: dict[str, Any]  # the results document (also written to --out)
    table: str  # printed last on stdout
    completed: int  # measured requests that succeeded (over all sweep points)


async def run_bench(cfg: BenchConfig, client: Any) -> Outcome:
    """Run `cfg` on a connected `AsyncClient` (or a stand-in with its `stream` and `model_info`)."""
    info = await client.model_info(timeout=cfg.timeout or MODEL_INFO_TIMEOUT_S)
    limits = ModelLimits(info.vocab_size, info.max_model_len, info.has_tokenizer)
    workload = build_workload(cfg.workload, limits)
    model = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
    _note(cfg, f"kvrelay bench: {cfg.endpoint} serves {info.model}; workload {workload.describe()}")
    if cfg.sweep is not None:
        sweep = await run_sweep(client, workload, cfg)
        body, table = sweep_json(sweep), format_sweep_table(cfg, sweep)
        completed = sum(p.metrics.completed for p in sweep.points)
    else:
        opts = RunOptions(seed=cfg.workload.seed, timeout=cfg.timeout, progress=not cfg.quiet)
        run = await drive(cfg, client, workload, cfg.load, opts)
        metrics = compute_metrics(run.records, run.duration_s, cfg.slo)
        body, table, completed = run_json(metrics, run), format_table(cfg, metrics, info.model), metrics.completed
    doc = result_json(cfg, model, workload.describe(), body)
    if cfg.out:
        write_json(cfg.out, doc)
        _note(cfg, f"kvrelay bench: results in {cfg.out}")
    if cfg.plot_dir:
        from bench.load.plots import write_plots  # matplotlib stays optional

        _note(cfg, "kvrelay bench: plots " + ", ".join(write_plots(doc, cfg.plot_dir)))
    return Outcome(doc, table, completed)


def _note(cfg: BenchConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)
