"""Drive the load: warm-up, then open-loop arrivals or closed-loop concurrency, one asyncio task per request."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.load import seeding
from bench.load.arrivals import arrival_times
from bench.load.config import LoadConfig, SamplingConfig
from bench.load.measure import measure_request
from bench.load.progress import Progress, ProgressSink
from bench.load.records import RequestRecord
from bench.load.shares import Share
from bench.load.workloads import Workload

SendFn = Callable[[int, float | None], Awaitable[RequestRecord]]  # sends request i (released at that time or now)
StartFn = Callable[[], Awaitable[float]]  # waits for the measured part to start; returns its t0 (perf_counter)


@dataclass
class RunResult:
    records: list[RequestRecord]  # the measured requests, in index order
    duration_s: float  # from the start (t0) until the last measured request ended
    warmup: list[RequestRecord]  # the warm-up requests (not in any statistic)


@dataclass(frozen=True)
class RunOptions:
    """How one run is carried out, beyond its load."""

    seed: int = 0
    timeout: float | None = None  # per-request deadline (s)
    index_offset: int = 0  # first workload index: a sweep gives each point fresh requests
    arrivals_key: int = 0  # which arrival stream of the seed: a sweep gives each point its own
    label: str = "bench"  # progress bar label
    progress: bool = True
    share: Share | None = None  # a worker process's share of the run's requests (and its own arrivals); None: all


def sampling_kwargs(sampling: SamplingConfig, seed: int, index: int) -> dict[str, Any]:
    """The SDK sampling kwargs of request `index` (max_tokens comes from its spec)."""
    kw: dict[str, Any] = {"ignore_eos": sampling.ignore_eos, "temperature": sampling.temperature}
    if sampling.temperature > 0:  # a per-request seed keeps sampled outputs, hence their lengths, reproducible
        kw["seed"] = int(seeding.rng(seed, seeding.SAMPLING, index).integers(0, 2**31))
    return kw


def _index(opts: RunOptions, i: int) -> int:
    """The workload index of this run's i-th request."""
    return opts.index_offset + (i if opts.share is None else opts.share.index(i))


async def run_load(client: Any, workload: Workload, load: LoadConfig, sampling: SamplingConfig,
                   opts: RunOptions = RunOptions(), *, start: StartFn | None = None,
                   progress: ProgressSink | None = None) -> RunResult:
    """Warm up, then measure. `client` is an `AsyncClient` (or anything with its `stream`). `start` (a worker
    process's) waits for the common start of all workers and gives its time; `progress` replaces the bar."""
    warm = await _warmup(client, workload, load, sampling, opts) if load.warmup else []
    t0 = await start() if start is not None else time.perf_counter()
    if progress is None:
        progress = Progress(opts.label, load.num_requests, load.duration, enabled=opts.progress)

    async def one(i: int, released: float | None = None) -> RequestRecord:
        idx = _index(opts, i)
        rec = await measure_request(client, workload.request(idx), idx, t0, sampling_kwargs(sampling, opts.seed, idx),
                                    opts.timeout, released)
        progress.update(rec)
        return rec

    if load.open_loop:
        records = await _open_loop(one, load, opts, t0)
    else:
        records = await _closed_loop(one, load, t0)
    duration = time.perf_counter() - t0
    progress.close()
    return RunResult(sorted(records, key=lambda r: r.index), duration, warm)


def _more(i: int, elapsed: float, load: LoadConfig) -> bool:
    """Whether request i may still be sent `elapsed` s into the run."""
    if load.num_requests is not None and i >= load.num_requests:
        return False
    return load.duration is None or elapsed < load.duration


async def _open_loop(one: SendFn, load: LoadConfig, opts: RunOptions, t0: float) -> list[RequestRecord]:
    assert load.rate is not None
    # An optional cap on requests in flight (vLLM's --max-concurrency): a request waiting for a slot is sent, and
    # timed, when it gets one.
    sem = asyncio.Semaphore(load.concurrency) if load.concurrency else None

    async def capped(i: int) -> RequestRecord:
        if sem is None:
            return await one(i, None)
        async with sem:
            return await one(i, None)

    # A worker process draws its own stream, keyed by its place among the workers.
    keys = () if opts.share is None else (opts.share.workers, opts.share.worker)
    rng = seeding.rng(opts.seed, seeding.ARRIVALS, opts.arrivals_key, *keys)
    tasks: list[asyncio.Task[RequestRecord]] = []
    for i, at in enumerate(arrival_times(load.rate, load.burstiness, rng)):
        if not _more(i, at, load):
            break
        # Sleep to each arrival's absolute time, so the event loop's lateness does not accumulate into a lower rate.
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(capped(i)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(one: SendFn, load: LoadConfig, t0: float) -> list[RequestRecord]:
    assert load.concurrency is not None
    counter = itertools.count()
    records: list[RequestRecord] = []

    async def user() -> None:  # one simulated user: sends its next request as soon as the previous one ends
        # The time that decides whether request i may still go is its start: building the request after the
        # check must not put a start past --duration.
        while _more(i := next(counter), (now := time.perf_counter()) - t0, load):
            records.append(await one(i, now))

    await asyncio.gather(*(user() for _ in range(load.concurrency)))
    return records


async def _warmup(client: Any, workload: Workload, load: LoadConfig, sampling: SamplingConfig,
                  opts: RunOptions) -> list[RequestRecord]:
    """`load.warmup` requests from the workload's warm-up sequence (this worker's share of it), `load.concurrency`
    (or 1) at a time."""
    progress = Progress("warm-up", load.warmup, None, enabled=opts.progress)
    sem = asyncio.Semaphore(load.concurrency or 1)
    t0 = time.perf_counter()

    async def one(k: int) -> RequestRecord:
        i = k if opts.share is None else opts.share.index(k)
        async with sem:
            rec = await measure_request(client, workload.request(i, warmup=True), i, t0,
                                        sampling_kwargs(sampling, opts.seed, i), opts.timeout)
        progress.update(rec)
        return rec

    records = list(await asyncio.gather(*(one(i) for i in range(load.warmup))))
    progress.close()
    return records
