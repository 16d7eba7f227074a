"""Independent, reproducible random streams derived from one `--seed`.

Each consumer draws from its own stream keyed by (seed, stream, *keys), so request i's prompt is a pure function of
(seed, i): it does not change with the arrival process, the concurrency, or how many requests came before it.
"""

from __future__ import annotations

import numpy as np

# Stream ids: never reuse or renumber one, or old seeds stop reproducing old workloads.
MEASURED = 0  # a measured request's prompt and lengths, keyed by its index
WARMUP = 1  # a warm-up request's prompt and lengths, keyed by its index
PREFIX = 2  # a shared-prefix group's system prompt, keyed by the group
ORDER = 3  # orderings: which prefix group a request uses, the dataset's order
ARRIVALS = 4  # inter-arrival gaps, keyed by the run (a sweep point)
SAMPLING = 5  # the per-request sampling seed sent to the server when temperature > 0


def rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator for one stream; keys must be non-negative ints."""
    return np.random.default_rng([seed, stream, *keys])
