"""Routing policy, the router's prefix index and its waiting room: pure Python, exact."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.admission import WaitingRoom
from router.errors import RequestError
from router.policy import RoutingPolicy, WorkerView
from router.prefix_index import PrefixIndex, block_hashes


def test_block_hashes_chain_full_blocks_only():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # 10 tokens = 2 full blocks of 4
    b = block_hashes(list(range(8)) + [99, 98, 97, 96], 4)
    assert b[:2] == a and len(b) == 3
    c = block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4)
    assert c[0] == a[0] and c[1] != a[1]
    assert block_hashes([5, 6, 7, 8, 0, 1, 2, 3], 4)[1] != a[0]  # a block's hash depends on its prefix


def test_prefix_index_matches_leading_blocks_and_evicts_tails_first():
    idx = PrefixIndex(capacity=4)
    p = block_hashes(list(range(12)), 4)  # 3 blocks
    idx.insert(p)
    assert idx.match(p) == 3 and idx.match(p[:1]) == 1
    assert idx.match(block_hashes([7] * 8, 4)) == 0
    q = block_hashes([50 + i for i in range(8)], 4)  # 2 more blocks: 5 > capacity 4
    idx.insert(q)
    assert len(idx) == 4
    assert idx.match(q) == 2
    assert idx.match(p) == 2  # p's tail block went first; its head still matches
    idx.insert(p[:1])  # touching a head keeps it
    idx.insert(block_hashes([90 + i for i in range(8)], 4))
    assert idx.match(p) == 1


def views(**loads):
    return [WorkerView(name, inflight=n) for name, n in loads.items()]


def test_cache_aware_prefers_longest_prefix_then_load():
    pol = RoutingPolicy("cache_aware", balance_abs_threshold=4)
    ws = views(a=2, b=0, c=1)
    assert pol.pick_prefill(ws, {"a": 3, "b": 1}).name == "a"
    assert pol.pick_prefill(ws, {"a": 2, "c": 2}).name == "c"  # tie on cache: less loaded
    assert pol.pick_prefill(ws, {}).name == "b"  # no hit anywhere: least loaded
    ws[0].inflight = 4  # a is now 4 busier than b: balance wins over the cached prefix
    assert pol.pick_prefill(ws, {"a": 3}).name == "b"
    ws[1].healthy = False
    assert pol.pick_prefill(ws, {"a": 3}).name == "a"  # now only 3 busier than c, the least loaded
    for w in ws:
        w.healthy = False
    assert pol.pick_prefill(ws, {"a": 3}) is None


def test_least_loaded_and_round_robin_ignore_the_cache():
    ws = views(a=1, b=0)
    assert RoutingPolicy("least_loaded").pick_prefill(ws, {"a": 9}).name == "b"
    rr = RoutingPolicy("round_robin")
    assert [rr.pick_prefill(ws, {}).name for _ in range(4)] == ["b", "a", "b", "a"]


def test_decode_groups_ranked_by_free_blocks_then_load():
    gs = [WorkerView("x", free_blocks=10, inflight=5), WorkerView("y", free_blocks=30, inflight=9),
          WorkerView("z", free_blocks=10, inflight=1), WorkerView("dead", free_blocks=99, healthy=False)]
    assert [g.name for g in RoutingPolicy().rank_decode(gs)] == ["y", "z", "x"]


def test_decode_groups_holding_the_prefix_go_first_unless_much_busier():
    gs = [WorkerView("x", free_blocks=10, inflight=2), WorkerView("y", free_blocks=30, inflight=0),
          WorkerView("z", free_blocks=20, inflight=1)]
    policy = RoutingPolicy("cache_aware", balance_abs_threshold=3)
    assert [g.name for g in policy.rank_decode(gs, {"x": 4, "z": 2})] == ["x", "z", "y"]
    gs[0].inflight = 3  # 3 busier than y: its cache no longer counts
    assert [g.name for g in policy.rank_decode(gs, {"x": 4, "z": 2})] == ["z", "y", "x"]
    assert [g.name for g in RoutingPolicy("least_loaded").rank_decode(gs, {"x": 4})] == ["y", "z", "x"]


class Room:
    """A resource with `free` seats; attempts take one or return None."""

    def __init__(self, free: int) -> None:
        self.free = free

    async def attempt(self):
        if self.free > 0:
            self.free -= 1
            return "seat"
        return None


def test_waiting_room_is_fifo_bounded_and_times_out():
    async def run():
        res, room = Room(1), WaitingRoom(max_waiting=2, poll_s=0.01)
        assert await room.acquire(res.attempt, 1.0) == ("seat", 0.0)
        order: list[int] = []

        async def waiter(i: int):
            await room.acquire(res.attempt, 5.0)
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
        await asyncio.sleep(0.05)
        assert room.waiting == 2
        with pytest.raises(RequestError) as e:  # the line is full
            await room.acquire(res.attempt, 1.0)
        assert e.value.code == "RESOURCE_EXHAUSTED" and "retry later" in e.value.message
        res.free = 1
        room.notify()
        await asyncio.sleep(0.05)
        assert order == [0] and room.waiting == 1
        res.free = 1
        await asyncio.sleep(0.05)  # no notify: the head's poll finds the seat
        assert order == [0, 1] and room.waiting == 0
        await asyncio.gather(*tasks)
        with pytest.raises(RequestError) as e:  # nothing frees up in time
            await room.acquire(res.attempt, 0.05)
        assert "within" in e.value.message and room.waiting == 0

    asyncio.run(run())


def test_waiting_room_waits_while_room_keeps_freeing_and_times_out_once_it_stops():
    async def run():
        res, room = Room(0), WaitingRoom(max_waiting=4, poll_s=0.01)
        waiter = asyncio.create_task(room.acquire(res.attempt, 0.1))
        for _ in range(5):  # 0.25 s in line, but something finished every 0.05 s: no timeout
            await asyncio.sleep(0.05)
            room.notify()
            assert not waiter.done()
        res.free = 1
        seat, waited = await waiter
        assert seat == "seat" and waited >= 0.25
        t = time.monotonic()
        with pytest.raises(RequestError, match="within"):  # nothing freed: the timeout runs out
            await room.acquire(res.attempt, 0.1)
        assert 0.09 < time.monotonic() - t < 0.5

    asyncio.run(run())


def test_waiting_room_cancelled_waiter_leaves_the_line():
    async def run():
        res, room = Room(0), WaitingRoom(max_waiting=4, poll_s=0.01)
        first = asyncio.create_task(room.acquire(res.attempt, 5.0))
        second = asyncio.create_task(room.acquire(res.attempt, 5.0))
        await asyncio.sleep(0.03)
        first.cancel()  # e.g. the client went away
        await asyncio.sleep(0.03)
        assert room.waiting == 1
        res.free = 1
        assert (await second)[0] == "seat"

    asyncio.run(run())
