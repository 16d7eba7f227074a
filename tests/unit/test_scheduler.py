"""Exact tests of the continuous-batching scheduler: budgets, chunking, queueing, preemption, no leaks."""

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import PLACEHOLDER, Sequence


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=True, max_model_len=64):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len, enable_chunked_prefill=chunked),
                     CacheConfig(block_size=block_size), num_blocks, eos_token_ids=[2])


def req(rid, n, max_tokens=4, start=10, **kw):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, **kw))


def rows(out):
    """(request id, start, tokens computed, samples?) per row."""
    return [(r, st, n, k >= 0) for r, st, n, k in zip(out.request_ids, out.starts, out.num_tokens, out.output_index)]


def sampled(out, token):
    """`token` (an int, or a function of the output index) for each sampling row, in row order."""
    return [token(k) if callable(token) else token for k in out.output_index if k >= 0]


def run_step(s: Scheduler, token=7):
    """Schedule, pretend to run, sample `token` for every row whose chunk ended at its sequence's last token."""
    out = s.schedule()
    if not out.is_empty:
        s.update(out, sampled(out, token))
    return out


def test_prefill_then_decode_is_a_diff():
    s = make()
    s.add(req("a", 6))
    s.add(req("b", 3))
    out = s.schedule()
    assert rows(out) == [("a", 0, 6, True), ("b", 0, 3, True)]
    assert out.token_ids == [10, 11, 12, 13, 14, 15, 10, 11, 12] and out.output_index == [0, 0]
    assert [(r.request_id, r.slot) for r in out.new_requests] == [("a", 0), ("b", 1)] and out.slots == [0, 1]
    assert out.new_blocks == [(0, 0, [0, 1]), (1, 0, [2])]
    s.update(out, [7, 8])
    out = s.schedule()
    assert rows(out) == [("a", 6, 1, True), ("b", 3, 1, True)] and out.token_ids == [7, 8]
    assert out.new_requests == [] and out.new_blocks == []  # nothing new: no table copied
    s.update(out, [7, 8])
    out = s.schedule()
    assert out.new_blocks == [(1, 1, [3])]  # b's 5th token opens block 3, allocated before the step runs
    assert s.seqs["b"].block_table == [2, 3]


def test_token_budget_chunks_long_prompt():
    s = make(budget=5)
    s.add(req("a", 12))
    chunks = [rows(run_step(s)) for _ in range(3)]
    assert chunks == [[("a", 0, 5, False)], [("a", 5, 5, False)], [("a", 10, 2, True)]]
    assert s.seqs["a"].output_token_ids == [7]


def test_running_decode_goes_before_new_prefill_chunk():
    s = make(budget=4)
    s.add(req("a", 2))
    run_step(s)
    s.add(req("b", 10))
    out = s.schedule()
    assert [(r, n) for r, _, n, _ in rows(out)] == [("a", 1), ("b", 3)]


def test_no_chunking_waits_for_budget():
    s = make(budget=64, chunked=False)
    s.add(req("a", 40))
    s.add(req("b", 40))
    assert s.schedule().request_ids == ["a"]


def test_max_num_seqs():
    s = make(max_seqs=2)
    for r in "abc":
        s.add(req(r, 2))
    assert s.schedule().request_ids == ["a", "b"]


def test_queue_when_blocks_run_out_and_admit_after_finish():
    s = make(num_blocks=4, block_size=4)
    s.add(req("a", 12, max_tokens=1))
    s.add(req("b", 8, max_tokens=1))
    out = run_step(s)
    assert out.request_ids == ["a"]  # b needs 2 blocks, 1 is free
    assert s.seqs.get("a") is None  # finished by max_tokens=1, blocks freed
    out = run_step(s)
    # b shares a's cached first block (same first 4 tokens) and takes block 3 (the least recently freed); a's slot
    assert out.request_ids == ["b"] and out.new_blocks == [(0, 0, [0, 3])]
    assert s.blocks.num_free_blocks == 4


def test_preempts_newest_when_running_requests_cannot_grow():
    s = make(num_blocks=4, block_size=4)
    s.add(req("a", 8, max_tokens=10))
    s.add(req("b", 8, max_tokens=10, start=50))
    run_step(s)  # both prefilled: 4 blocks used; each sampled one token and needs a 3rd block now
    out = s.schedule()
    assert out.preempted == ["b"]
    assert out.request_ids == ["a"]
    b = s.seqs["b"]
    assert b.block_table == [] and b.num_computed_tokens == 0 and s.waiting[0] is b and b.slot == -1
    assert b.output_token_ids == [7]  # kept: recomputed later from prompt + outputs
    s.update(out, [7])


def test_preempted_request_is_recomputed_exactly():
    s = make(num_blocks=4, block_size=4)  # 16 tokens: each request alone may reach 16 (8 prompt + 8 generated)
    s.add(req("a", 8, max_tokens=10))
    s.add(req("b", 8, max_tokens=10, start=50))
    seqs = dict(s.seqs)
    b_rows = []
    steps = 0
    while s.has_unfinished():
        out = s.schedule()
        b_rows += [(st, out.token_ids[sum(out.num_tokens[:i]):sum(out.num_tokens[:i + 1])], out.output_index[i])
                   for i, (r, st) in enumerate(zip(out.request_ids, out.starts)) if r == "b"]
        s.update(out, sampled(out, lambda k: 7 if k == 0 else 20 + k))
        steps += 1
        assert steps < 50
    assert s.num_preemptions == 1 and seqs["b"].num_preemptions == 1
    # b was preempted after its first token; recomputed from its prompt and that token, it resumes at output 1.
    assert b_rows[1] == (0, list(range(50, 58)) + [7], 1)
    expected = [7] + [20 + k for k in range(1, 8)]  # 8 + 8 tokens fill the pool: "length"
    assert seqs["a"].output_token_ids == expected and seqs["b"].output_token_ids == expected
    assert {r: q.finish_reason for r, q in seqs.items()} == {"a": "length", "b": "length"}
    assert s.blocks.num_free_blocks == 4 and all(r == 0 for r in s.blocks.pool.ref_cnt)


def test_a_lone_request_never_needs_preemption():
    # The pool bounds a request's total length, so one request alone always fits.
    s = make(num_blocks=2, block_size=4)
    s.add(req("a", 7, max_tokens=10))
    while s.has_unfinished():
        assert run_step(s).preempted == []
    assert s.num_preemptions == 0


# ---- async scheduling: steps scheduled before the previous one is collected ------------------------------

def test_lookahead_feeds_placeholders_and_resolves_in_order():
    s = make()
    s.add(req("a", 3, max_tokens=5))
    o1 = s.schedule()
    o2 = s.schedule()  # before o1 is collected: a decodes the token o1 samples, read on the device
    assert rows(o2) == [("a", 3, 1, True)] and o2.token_ids == [PLACEHOLDER] and o2.output_index == [1]
    a = s.seqs["a"]
    assert a.token_ids == [10, 11, 12, PLACEHOLDER, PLACEHOLDER] and a.output_token_ids == []
    assert [q.request_id for q in s.update(o1, [7])] == ["a"]
    assert a.token_ids == [10, 11, 12, 7, PLACEHOLDER] and a.output_token_ids == [7]
    with pytest.raises(RuntimeError, match="order"):
        s.update(s.schedule(), [1])  # o2 is older


def test_stop_seen_late_drops_the_extra_token_and_frees_after_collection():
    s = make()
    s.add(req("a", 3, max_tokens=5))
    o1 = s.schedule()
    o2 = s.schedule()
    s.update(o1, [7])
    o3 = s.schedule()  # a's 5th token opens block 1
    assert o3.new_blocks == [(0, 1, [1])]
    a = s.seqs["a"]
    assert [q.request_id for q in s.update(o2, [2])] == ["a"] and a.finish_reason == "stop"  # EOS
    assert a.block_table == [0, 1] and s.blocks.pool.ref_cnt[:2] == [1, 1]  # o3 still writes them
    assert s.update(o3, [9]) == []  # the token after EOS is dropped
    assert a.output_token_ids == [7, 2] and a.block_table == [] and s.blocks.pool.ref_cnt[:2] == [0, 0]
    assert s.blocks.num_free_blocks == 16 and not s.has_unfinished()


def test_abort_in_flight_holds_blocks_and_slot_until_collected():
    s = make()
    s.add(req("a", 5))
    o1 = s.schedule()
    assert s.finish("a", "abort").finish_reason == "abort"
    assert s.blocks.pool.ref_cnt[:2] == [1, 1] and s.blocks.num_free_blocks == 14
    s.add(req("b", 3))
    o2 = s.schedule()
    assert o2.new_blocks == [(1, 0, [2])] and o2.slots == [1]  # a's blocks 0, 1 and slot 0 stay a's
    assert s.update(o1, [7]) == []  # a is not reported again
    assert s.blocks.pool.ref_cnt[:3] == [0, 0, 1] and s.blocks.num_free_blocks == 15
    s.update(o2, [7])


def test_limit_reached_by_placeholders_waits_for_collection():
    s = make()
    s.add(req("a", 3, max_tokens=2, ignore_eos=True))
    o1 = s.schedule()
    o2 = s.schedule()
    assert s.schedule().is_empty  # both tokens it may have are in flight
    s.update(o1, [5])
    assert [q.finish_reason for q in s.update(o2, [6])] == ["length"]
    assert not s.has_unfinished() and s.blocks.num_free_blocks == 16


def test_preemption_never_happens_with_a_step_in_flight():
    s = make(num_blocks=4, block_size=4)
    s.add(req("a", 8, max_tokens=10))
    s.add(req("b", 8, max_tokens=10, start=50))
    o1 = s.schedule()
    assert s.may_preempt()  # 0 free blocks < 2 running + 16 blocks of budget
    with pytest.raises(RuntimeError, match="collect them first"):
        s.schedule()
    s.update(o1, [7, 7])


def test_prefix_hit_counted_once_and_reused():
    s = make()
    s.add(req("a", 9, max_tokens=1))
    run_step(s)
    s.add(req("b", 9, max_tokens=1))
    out = s.schedule()
    assert rows(out) == [("b", 8, 1, True)] and out.new_blocks == [(0, 0, [0, 1, 3])]  # blocks 0, 1 shared
    assert s.seqs["b"].num_cached_tokens == 8
    assert (s.blocks.prefix_queries, s.blocks.prefix_hits) == (18, 8)


def test_finish_reasons_and_no_leaks():
    s = make()
    s.add(req("eos", 3, max_tokens=5))
    s.add(req("stopid", 3, max_tokens=5, stop_token_ids=(9,)))
    s.add(req("ign", 3, max_tokens=2, ignore_eos=True))
    seqs = dict(s.seqs)
    out = s.schedule()
    s.update(out, [2, 9, 2])
    out = s.schedule()
    s.update(out, [2])
    assert {r: q.finish_reason for r, q in seqs.items()} == {"eos": "stop", "stopid": "stop", "ign": "length"}
    assert seqs["ign"].output_token_ids == [2, 2]
    assert not s.has_unfinished()
    assert s.blocks.num_free_blocks == 16 and all(r == 0 for r in s.blocks.pool.ref_cnt)


def test_abort_waiting_and_running_frees_everything():
    s = make()
    s.add(req("a", 5))
    s.add(req("b", 5))
    run_step(s)
    s.add(req("c", 5))
    assert s.finish("a", "abort").finish_reason == "abort"
    assert s.finish("c", "abort").finish_reason == "abort"
    assert s.finish("nope", "abort") is None
    s.finish("b", "abort")
    assert not s.has_unfinished() and s.blocks.num_free_blocks == 16


def test_rejects_prompt_that_cannot_fit():
    s = make(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="at most 15 fit"):
        s.add(req("a", 16))
    s.add(req("b", 15))
    with pytest.raises(ValueError, match="already in use"):
        s.add(req("b", 3))


def test_length_limit_from_pool_and_model_len():
    s = make(num_blocks=2, block_size=4, max_model_len=64)
    s.add(req("a", 6, max_tokens=100))
    for _ in range(3):
        run_step(s)
    assert not s.has_unfinished()  # 6 prompt + 2 generated = 8 = the whole pool: "length"


def test_may_preempt_needs_the_budget_only_while_prompts_are_mid_chunk():
    s = make(num_blocks=13, block_size=4, budget=32)  # budget = 8 blocks
    s.add(req("a", 4, max_tokens=20))
    s.add(req("b", 4, max_tokens=20, start=50))
    s.add(req("c", 20, max_tokens=20, start=100))
    run_step(s)  # three prompts: chunks, so a next step could still carry a budget's worth of chunk
    assert s.blocks.num_free_blocks == 6 and s.may_preempt()  # 6 < 3 running + 8
    run_step(s)  # decodes only; each opened a block
    assert s.blocks.num_free_blocks == 3 and not s.may_preempt()  # three decodes need three blocks at most
