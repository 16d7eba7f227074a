"""`--processes N`: how one run's load is split over N worker processes. Pure arithmetic, no I/O.

Closed loop: worker w runs `concurrency // N` users (+1 for the first `concurrency % N`) and sends a disjoint share of
the run's request indices; the shares' union is exactly the indices one process would send, each once. Indices are
dealt in blocks of `concurrency`: in each block worker w owns the positions r with r % N == w, i.e. as many as it has
users, so every worker's share is its share of the concurrency (they finish together), and the requests in flight
at once stay close in index as in one process. Open loop: each worker gets rate R / N and its own arrival stream
(the run's arrivals are the superposition of N such streams: for Poisson exactly a Poisson process at R), and the
indices are dealt round-robin. Warm-up requests are split the same way over their own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.load.config import LoadConfig


@dataclass(frozen=True)
class Share:
    """Which requests worker `worker` of `workers` sends: its k-th request is run index `index(k)`."""

    worker: int
    workers: int
    block: int  # indices are dealt in blocks of this many: the closed loop's concurrency; `workers` in open loop

    def __post_init__(self) -> None:
        if not 0 <= self.worker < self.workers <= self.block:
            raise ValueError(f"a share needs 0 <= worker < workers <= block, got {self.worker}, {self.workers}, "
                             f"{self.block}")

    @property
    def per_block(self) -> int:
        """This worker's positions in each block (its users, in a closed loop)."""
        return len(range(self.worker, self.block, self.workers))

    def index(self, k: int) -> int:
        """The run index of this worker's k-th request (k >= 0)."""
        b, j = divmod(k, self.per_block)
        return b * self.block + self.worker + j * self.workers

    def count(self, n: int) -> int:
        """How many of the run indices 0 .. n-1 are this worker's."""
        b, r = divmod(n, self.block)
        return b * self.per_block + len(range(self.worker, r, self.workers))


def split_concurrency(concurrency: int, workers: int) -> list[int]:
    """Users (or the in-flight cap) of each worker: C // N, plus one for the first C % N."""
    return [concurrency // workers + (w < concurrency % workers) for w in range(workers)]


def split_rate(rate: float, workers: int) -> list[float]:
    """Each worker's arrival rate: R / N (inf stays inf)."""
    return [rate / workers] * workers


def worker_loads(load: LoadConfig) -> list[tuple[LoadConfig, Share]]:
    """Each worker's own single-process load and its share of the run's requests. `num_requests`, `warmup` and
    `duration` keep their meaning for the whole run: the counts are split, the duration is every worker's."""
    n = load.processes
    block = n if load.open_loop or load.concurrency is None else load.concurrency
    caps = split_concurrency(load.concurrency, n) if load.concurrency is not None else [None] * n
    rates = split_rate(load.rate, n) if load.rate is not None else [None] * n
    out = []
    for w in range(n):
        share = Share(w, n, block)
        out.append((replace(load, rate=rates[w], concurrency=caps[w], warmup=share.count(load.warmup), processes=1,
                            num_requests=None if load.num_requests is None else share.count(load.num_requests)),
                    share))
    return out
