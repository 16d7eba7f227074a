"""The search behind `--sweep`: the highest request rate whose SLO attainment reaches a target.

Pure bookkeeping, no I/O: the caller asks `next_rate()`, runs the system at that rate, and `record()`s whether it
met the target. Assumes attainment falls as the rate grows (true of a queueing system, up to measurement noise).
Phase 1 brackets the answer: from the start rate, double while the target is met (or halve while it is missed).
Phase 2 bisects the bracket [highest rate met, lowest rate missed] until it is within the relative tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.load.config import SweepConfig


@dataclass(frozen=True)
class Probe:
    rate: float
    met: bool


class RateSearch:
    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.probes: list[Probe] = []
        self.best: float | None = None  # highest rate that met the target
        self.worst: float | None = None  # lowest rate that missed it
        self.capped = False  # the target was met at max_rate: the real answer may lie above

    def next_rate(self) -> float | None:
        """The next rate to run, or None when the search is over."""
        cfg = self.cfg
        if not self.probes:
            return cfg.start_rate
        if len(self.probes) >= cfg.max_points:
            return None
        if self.worst is None:  # every rate so far met: go up
            assert self.best is not None
            if self.best >= cfg.max_rate:
                self.capped = True
                return None
            return min(self.best * 2, cfg.max_rate)
        if self.best is None:  # every rate so far missed: go down
            return self.worst / 2 if self.worst / 2 >= cfg.min_rate else None
        if (self.worst - self.best) / self.best <= cfg.tolerance:
            return None
        return (self.best + self.worst) / 2

    def record(self, rate: float, met: bool) -> None:
        self.probes.append(Probe(rate, met))
        if met:
            self.best = rate if self.best is None else max(self.best, rate)
        else:
            self.worst = rate if self.worst is None else min(self.worst, rate)
