"""Open-loop arrival processes: when each request is sent, as offsets (s) from the start of the run.

As in vLLM's benchmark_serving, the gaps between arrivals are gamma-distributed with shape = burstiness and
scale = 1 / (rate * burstiness): the mean gap is 1/rate whatever the burstiness, and the coefficient of variation of
the gaps is 1/sqrt(burstiness). Burstiness 1 is exponential gaps, i.e. a Poisson process; below 1 the arrivals come
in bursts, above 1 they are more regular. An infinite rate sends every request at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

_BLOCK = 1024  # gaps drawn per numpy call: cheap, and the sequence does not depend on how many are consumed


def inter_arrival_gaps(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless gaps (s) between consecutive arrivals."""
    if not rate > 0.0:
        raise ValueError(f"the request rate must be > 0 req/s (or inf), got {rate}")
    if not burstiness > 0.0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness}")
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        yield from rng.gamma(shape=burstiness, scale=scale, size=_BLOCK).tolist()


def arrival_times(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless arrival offsets (s): the first request goes at 0, each next one a gap later."""
    t = 0.0
    yield t
    for gap in inter_arrival_gaps(rate, burstiness, rng):
        t += gap
        yield t
