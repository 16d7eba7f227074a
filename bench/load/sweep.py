"""`--sweep`: short open-loop runs at the rates RateSearch asks for, until it has bracketed the highest rate whose
SLO attainment reaches the target. Every point measured is kept and reported."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.load.config import BenchConfig
from bench.load.metrics import Metrics, compute_metrics
from bench.load.processes import drive
from bench.load.rate_search import RateSearch
from bench.load.runner import RunOptions, RunResult
from bench.load.workloads import Workload


@dataclass
class SweepPoint:
    rate: float
    met: bool  # slo_attainment >= the target
    metrics: Metrics
    run: RunResult


@dataclass
class SweepResult:
    attainment: float  # the target
    best_rate: float | None  # the highest rate measured that met it; None if even the lowest rate tried missed
    lowest_missed_rate: float | None  # the lowest rate that missed; None if none did (the answer may be higher)
    capped: bool  # met at the sweep's max rate
    points: list[SweepPoint]

    @property
    def best_point(self) -> SweepPoint | None:
        return next((p for p in self.points if p.rate == self.best_rate), None)


async def run_sweep(client: Any, workload: Workload, cfg: BenchConfig) -> SweepResult:
    assert cfg.sweep is not None
    search = RateSearch(cfg.sweep)
    points: list[SweepPoint] = []
    sent = 0  # requests used so far: each point draws fresh ones, so no point hits prompts a previous one cached
    while (rate := search.next_rate()) is not None:
        k = len(points)
        # Warm up once, before the first point only.
        load = replace(cfg.load, rate=rate, warmup=cfg.load.warmup if k == 0 else 0)
        opts = RunOptions(seed=cfg.workload.seed, timeout=cfg.timeout, index_offset=sent, arrivals_key=k,
                          label=f"rate {rate:.4g}", progress=not cfg.quiet)
        run = await drive(cfg, client, workload, load, opts)  # over cfg.load.processes workers, as every run
        sent += len(run.records)
        m = compute_metrics(run.records, run.duration_s, cfg.slo)
        met = m.slo_attainment >= cfg.sweep.attainment
        search.record(rate, met)
        points.append(SweepPoint(rate, met, m, run))
    return SweepResult(cfg.sweep.attainment, search.best, search.worst, search.capped, points)
