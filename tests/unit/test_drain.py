"""Draining as both ends see it: the worker's refusal, the router telling it from a failure, and the routing
policy skipping a draining worker."""

from __future__ import annotations

import grpc
import pytest

from router.policy import RoutingPolicy, WorkerView
from router.worker_api import WorkerError
from worker_runtime.drain import Drain
from worker_runtime.rpc import Refusal


def test_a_draining_worker_refuses_new_work_as_unavailable():
    d = Drain()
    d.check("decode group d0")  # not draining: nothing raised
    d.begin()
    with pytest.raises(Refusal) as e:
        d.check("decode group d0")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.message == "decode group d0 is draining"
    assert d.draining


def test_the_router_tells_a_draining_refusal_from_a_failure():
    assert WorkerError("UNAVAILABLE", "decode group d0 is draining").draining
    assert not WorkerError("UNAVAILABLE", "decode group d0: engine died").draining
    assert not WorkerError("RESOURCE_EXHAUSTED", "decode group d0 is draining").draining


def test_the_policy_skips_draining_workers():
    a, b = WorkerView("a", free_blocks=10, num_blocks=10), WorkerView("b", free_blocks=1, num_blocks=10)
    a.draining = True
    for name in ("cache_aware", "least_loaded", "round_robin"):
        policy = RoutingPolicy(name, 4)
        assert [v.name for v in policy.rank_decode([a, b], {})] == ["b"]
        assert policy.pick_prefill([a, b], {}).name == "b"
    b.draining = True
    assert RoutingPolicy("least_loaded", 4).pick_prefill([a, b], {}) is None
