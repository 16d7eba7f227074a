"""Summary statistics of a latency sample: mean, std, min, p50, p90, p99, max."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default, as vLLM reports)."""
    if not values:
        raise ValueError("percentile of an empty sample")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float], scale: float = 1.0) -> Summary | None:
    """Statistics of `values` times `scale` (e.g. 1e3 for s -> ms); None for an empty sample, which the report
    shows as missing rather than as a misleading 0."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = (float(v) for v in np.percentile(a, PERCENTILES))
    return Summary(count=int(a.size), mean=float(a.mean()), std=float(a.std()), min=float(a.min()), p50=p50,
                   p90=p90, p99=p99, max=float(a.max()))
