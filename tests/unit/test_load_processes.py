"""`--processes N`: how a run's load is split over worker processes (pure), the runner sending one worker's share,
and a worker that fails stopping the run with an error that names it."""

import asyncio
import math

import pytest
from test_load_runner import FakeClient, workload

from bench.load.cli import build_parser, config_from_args
from bench.load.config import BenchConfig, LoadConfig, SamplingConfig, WorkloadConfig
from bench.load.processes import WorkerError, run_processes
from bench.load.runner import RunOptions, run_load
from bench.load.shares import Share, split_concurrency, split_rate, worker_loads


def test_concurrency_splits_as_evenly_as_it_can_first_workers_first():
    assert split_concurrency(5, 2) == [3, 2]
    assert split_concurrency(256, 3) == [86, 85, 85]
    assert split_concurrency(4, 4) == [1, 1, 1, 1]
    assert split_rate(10.0, 4) == [2.5] * 4
    assert split_rate(math.inf, 2) == [math.inf, math.inf]


@pytest.mark.parametrize("block", [3, 4, 7])  # open loop (block = workers) and closed loops of 4 and 7 users
def test_shares_are_disjoint_and_cover_every_request_once(block):
    shares = [Share(w, 3, block) for w in range(3)]
    for n in (3, 10, 11, 30):
        sent = [[s.index(k) for k in range(s.count(n))] for s in shares]
        flat = [i for part in sent for i in part]
        assert sorted(flat) == list(range(n)) and len(set(flat)) == n  # the union is all n, each once
        assert all(part == sorted(part) for part in sent)  # each worker goes through the run in order
    # Beyond n (a --duration run): the shares go on, still disjoint.
    assert len({s.index(k) for s in shares for k in range(100)}) == 300


def test_closed_loop_shares_follow_each_workers_users():
    # Concurrency 5 over 2: 3 and 2 users; every block of 5 requests gives 3 to the first worker and 2 to the other.
    a, b = Share(0, 2, 5), Share(1, 2, 5)
    assert [a.index(k) for k in range(6)] == [0, 2, 4, 5, 7, 9]
    assert [b.index(k) for k in range(4)] == [1, 3, 6, 8]
    assert (a.count(10), b.count(10)) == (6, 4)


def test_worker_loads_split_counts_and_keep_the_duration():
    closed = worker_loads(LoadConfig(concurrency=5, num_requests=10, warmup=3, duration=9.0, processes=2))
    assert [(w.concurrency, w.num_requests, w.warmup, w.duration, w.processes) for w, _ in closed] == [
        (3, 6, 2, 9.0, 1), (2, 4, 1, 9.0, 1)]
    opened = worker_loads(LoadConfig(rate=9.0, concurrency=4, num_requests=10, processes=3, burstiness=0.5))
    assert [(w.rate, w.concurrency, w.num_requests, w.burstiness) for w, _ in opened] == [
        (3.0, 2, 4, 0.5), (3.0, 1, 3, 0.5), (3.0, 1, 3, 0.5)]
    assert [s.block for _, s in opened] == [3, 3, 3]  # open loop: round-robin
    endless = worker_loads(LoadConfig(concurrency=4, duration=1.0, processes=2))
    assert [w.num_requests for w, _ in endless] == [None, None]


def test_workers_shares_sent_by_the_runner_are_the_single_process_run():
    sampling = SamplingConfig(ignore_eos=True)
    load = LoadConfig(concurrency=5, num_requests=10, warmup=3, processes=2)
    one = FakeClient()
    whole = asyncio.run(run_load(one, workload(), LoadConfig(concurrency=5, num_requests=10, warmup=3), sampling,
                                 RunOptions(progress=False)))
    records, warm, clients = [], [], []
    for wload, share in worker_loads(load):
        c = FakeClient()
        part = asyncio.run(run_load(c, workload(), wload, sampling, RunOptions(progress=False, share=share)))
        assert c.max_in_flight == wload.concurrency
        records += part.records
        warm += part.warmup
        clients.append(c)
    assert sorted(r.index for r in records) == list(range(10)) and sorted(r.index for r in warm) == [0, 1, 2]
    sent = sorted(tuple(call["prompt"]) for c in clients for call in c.calls)
    assert sent == sorted(tuple(call["prompt"]) for call in one.calls)  # the same 13 prompts, each once
    by_index = {r.index: (r.prompt_len, r.output_len) for r in whole.records}
    assert {r.index: (r.prompt_len, r.output_len) for r in records} == by_index


def test_open_loop_workers_draw_their_own_arrivals():
    sampling = SamplingConfig()
    starts = []
    for wload, share in worker_loads(LoadConfig(rate=200.0, num_requests=6, processes=2)):
        res = asyncio.run(run_load(FakeClient(), workload(), wload, sampling, RunOptions(progress=False, share=share)))
        starts.append([r.start_s for r in res.records])
    assert starts[0][1] != pytest.approx(starts[1][1], abs=1e-4)  # two streams, not one stream twice


@pytest.mark.parametrize("argv,message", [
    (["--concurrency", "1", "--processes", "2"], "--concurrency 1 is fewer than --processes 2"),
    (["--rate", "1", "--num-requests", "2", "--processes", "3"], "--num-requests 2 is fewer than --processes 3"),
    (["--rate", "1", "--processes", "0"], "--processes must be >= 1"),
])
def test_bad_process_counts_say_what_to_fix(argv, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(build_parser().parse_args(argv))


def test_a_failing_worker_stops_the_run_with_an_error_naming_it():
    # Nothing listens on port 9 (discard): each worker's first request to the server fails, before any measurement.
    cfg = BenchConfig(target="unused:1", workload=WorkloadConfig(), backend="openai",
                      base_url="http://127.0.0.1:9/v1", timeout=10.0,
                      load=LoadConfig(concurrency=2, num_requests=2, processes=2))
    with pytest.raises(WorkerError, match=r"load worker [01] of 2 failed: (ConnectError|OpenAIError)"):
        asyncio.run(run_processes(cfg, workload(), cfg.load, RunOptions(progress=False)))
