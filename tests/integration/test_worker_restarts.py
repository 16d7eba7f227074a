"""Restart, rejoin and migration on a real deployment of its own (Ray actors: 1 prefill worker, 1 decode group of
TP 2, supervised, 8 seats): a worker SIGKILLed while 8 streams are in flight is restarted by Ray, started by the
supervisor, re-wired and back in rotation; every stream completes with exactly the tokens of an unfailed run
(greedy and seeded; a stream on a lost decode group migrates as prompt + its streamed tokens); health goes
NOT_SERVING and back to SERVING; new requests succeed within 30 s; no block is held afterwards."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from threaded_streams import Streams

from client import Client
from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTS = ["Return a list of", "The default value is", "If the file does not exist,", "Raise a ValueError",
           "This module provides", "Return True if the", "Parse the arguments", "Open the file and"]
MAX_TOKENS = 48
# Half greedy, half seeded sampling: a migrated seeded stream keeps its noise (position-derived).
PARAMS = [dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) if i % 2 == 0 else
          dict(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
          for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def served():
    """Its own deployment: the session's has 4 seats, and its workers must stay where the other tests find them."""
    from serving import start_serving

    s = start_serving(supervise=True, max_num_seqs=8, max_queued_requests=16, max_restarts=3)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs():
    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=512)
    return [llm.generate([p], SamplingParams(**kw))[0].token_ids for p, kw in zip(PROMPTS, PARAMS)]


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def pid_of(actor) -> int:
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor cannot import this test module
    return ray.get(actor.__ray_call__.remote(lambda a: os.getpid()), timeout=30)


@pytest.mark.parametrize("victim", ["prefill", "decode rank 0", "decode rank 1"])
def test_sigkilled_worker_restarts_and_streams_complete_exactly(served, refs, victim):
    assert served.supervisor is not None
    served.wait_all_free()
    name = "prefill-0" if victim == "prefill" else "decode-0"
    actor = served.deployment.units()[name][0 if victim != "decode rank 1" else 1]
    pid = pid_of(actor)
    restarts = served.supervisor.restarts.get(name, 0)
    migrations = _counter(served, "kvrelay:request_migrations_total")
    statuses: list[int] = []
    watching = threading.Event()

    def watch_health() -> None:
        while not watching.is_set():
            statuses.append(health(served.target))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    streams = Streams(served.target, PROMPTS, PARAMS)
    streams.wait_started()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    streams.join()
    assert streams.errors == [None] * len(PROMPTS)
    for i, (got, ref) in enumerate(zip(streams.tokens, refs)):
        # no token repeated or missing, greedy and seeded alike
        assert got == ref, (i, len(got), next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None), got,
                            ref)
    # New requests succeed again within 30 s of the kill.
    with Client(served.target, timeout=60) as c:
        while True:
            try:
                assert c.generate(PROMPTS[0], **PARAMS[0]).token_ids == refs[0]
                break
            except Exception:
                assert time.monotonic() - killed < 30
                time.sleep(0.2)
    assert time.monotonic() - killed < 30
    deadline = time.monotonic() + 30
    while statuses[-1] != SERVING or NOT_SERVING not in statuses:
        assert time.monotonic() < deadline, statuses[-20:]
        time.sleep(0.05)
    watching.set()
    watcher.join(10)
    first_down = statuses.index(NOT_SERVING)
    assert SERVING in statuses[first_down:]  # NOT_SERVING while restarting, then SERVING again
    assert served.supervisor.restarts[name] == restarts + 1
    if victim != "prefill":  # the decode group's streams were in flight on it: every one migrated once
        assert _counter(served, "kvrelay:request_migrations_total") - migrations == len(PROMPTS)
    assert pid_of(actor) != pid  # a new process
    loads = served.wait_all_free()  # every worker's free blocks equal its total again
    assert all(x.free_blocks == x.num_blocks for x in loads)


def _counter(served, name: str) -> float:
    m = served.router.metrics
    return m.registry.get_sample_value(name, {"model_name": m.model_name}) or 0.0
