"""The KV connector's scheduler side on a decode engine: reservations share the cached prefix, readiness needs every
rank and the first token, deadlines fail."""

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_connector import RemoteReservation, SchedulerConnector
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import TransferEvents
from engine.sequence import Sequence


def test_ready_needs_all_ranks_and_first_token():
    r = SchedulerConnector(block_size=4, tp_size=2)
    r.await_transfer("a", timeout_s=60)
    r.await_transfer("b", timeout_s=60)
    assert r.fold([TransferEvents(landed=["a"]), TransferEvents()]) == ([], {})
    r.set_first_token("a", 9)
    assert r.fold([TransferEvents(), TransferEvents(landed=["a", "b"])]) == ([("a", 9)], {})
    assert r.fold([TransferEvents(recv_failed={"b": "boom"}), TransferEvents(landed=["b"])]) == ([], {"b": "boom"})
    assert r.pending == {}


def test_deadline_covers_landing_and_first_token():
    now = [100.0]
    r = SchedulerConnector(block_size=4, tp_size=1, clock=lambda: now[0])
    r.await_transfer("no_kv", timeout_s=10)
    r.await_transfer("no_token", timeout_s=10)
    r.await_transfer("late", timeout_s=30)
    r.fold([TransferEvents(landed=["no_token"])])
    now[0] = 110.0
    assert r.fold([]) == ([], {})  # at the deadline, not past it
    now[0] = 110.5
    ready, failed = r.fold([])
    assert ready == [] and "within its deadline" in failed["no_kv"] and "first token" in failed["no_token"]
    assert set(failed) == {"no_kv", "no_token"} and list(r.pending) == ["late"]


def test_reservations_hold_blocks_and_seats():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64),
                  CacheConfig(block_size=4), num_blocks=8)
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    assert s.reserve_remote(Sequence("r", list(range(10, 19)), p)) == RemoteReservation([0, 1, 2], 0)
    s.add(Sequence("w1", [5, 6], p))
    s.add(Sequence("w2", [7, 8], p))
    out = s.schedule()
    assert out.request_ids == ["w1"]  # the reservation takes one of the two seats
    seq = s.admit_remote("r", 42)
    assert seq.num_computed_tokens == 9 and seq.token_ids[-1] == 42 and seq in s.running
    s.update(out, [1])
    out = s.schedule()
    assert out.request_ids == ["w1", "r"] and out.starts == [2, 9] and out.token_ids == [1, 42]
    assert [(n.request_id, n.slot) for n in out.new_requests] == [("r", 1)]
    assert out.new_blocks == [(1, 0, [0, 1, 2])]  # the runner learns r's table once, when it first runs
    assert s.reserve_remote(Sequence("r2", [1, 2, 3], p)) is None  # no seat left
    s.finish("r", "abort")
    assert s.blocks.pool.ref_cnt[:3] == [1, 1, 1]  # the step in flight still writes r's blocks
    assert [q.request_id for q in s.update(out, [1, 5])] == ["w1"]
    assert s.blocks.pool.ref_cnt[:3] == [0, 0, 0]


def test_reservations_yield_to_waiting_work_and_leave_growth_room():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                  CacheConfig(block_size=4), num_blocks=6)
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    s.add(Sequence("a", [1, 2, 3, 4], p))
    s.add(Sequence("b", [5, 6, 7, 8], p))
    assert s.reserve_remote(Sequence("r", [9] * 5, p)) is None  # local requests are waiting
    s.schedule()  # a and b run: 2 blocks used, 4 free
    assert s.reserve_remote(Sequence("r", [9] * 9, p)) is None  # 3 blocks + 2 growth blocks > 4
    assert s.reserve_remote(Sequence("r", [9] * 8, p)).block_ids == [2, 3]  # 2 blocks + 2 growth blocks fit


def test_reservation_shares_the_prefix_this_pool_holds():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                  CacheConfig(block_size=4), num_blocks=12)
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    first = s.reserve_remote(Sequence("a", list(range(10, 21)), p))  # 11 tokens: blocks 0, 1, 2
    assert first == RemoteReservation([0, 1, 2], 0) and first.missing_blocks == [0, 1, 2]
    s.admit_remote("a", 7)  # landed: its two full blocks enter the prefix cache
    # Same first 8 tokens: blocks 0 and 1 are shared (ref count 2), only the third block is reserved and sent.
    second = s.reserve_remote(Sequence("b", list(range(10, 18)) + [50, 51, 52, 53, 54], p))
    assert second == RemoteReservation([0, 1, 3, 4], 2) and second.missing_blocks == [3, 4]
    assert s.blocks.pool.ref_cnt[:5] == [2, 2, 1, 1, 1] and s.seqs["b"].num_cached_tokens == 8
    assert (s.blocks.prefix_queries, s.blocks.prefix_hits) == (24, 8)
    s.finish("a", "abort")
    s.finish("b", "abort")
    assert s.blocks.num_free_blocks == 12
    # Freed, the prefix stays cached: a third request sharing it takes blocks 0, 1 back from the free queue.
    third = s.reserve_remote(Sequence("c", list(range(10, 18)) + [9], p))
    assert third.num_cached_blocks == 2 and third.block_ids[:2] == [0, 1]
