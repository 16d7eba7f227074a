"""Exact tests of the continuous-batching scheduler: budgets, chunking, queueing, preemption, no leaks."""

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=True, max_model_len=64):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len, enable_chunked_prefill=chunked),
                     CacheConfig(block_size=block_size), num_blocks, eos_token_ids=[2])


def req(rid, n, max_tokens=4, start=10, **kw):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, **kw))


def run_step(s: Scheduler, token=7):
    """Schedule, pretend to run, sample `token` for every sequence whose chunk ended at its last token."""
    out = s.schedule()
    sampled = {x.request_id: token for x in out.seqs if x.sample}
    s.update(out, sampled)
    return out


def test_prefill_then_decode_shapes():
    s = make()
    s.add(req("a", 6))
    s.add(req("b", 3))
    out = s.schedule()
    assert [(x.request_id, x.start, len(x.token_ids), x.sample) for x in out.seqs] == [
        ("a", 0, 6, True), ("b", 0, 3, True)]
    assert out.seqs[0].block_table == [0, 1] and out.seqs[1].block_table == [2]
    s.update(out, {"a": 7, "b": 8})
    out = s.schedule()
    assert [(x.request_id, x.start, x.token_ids) for x in out.seqs] == [("a", 6, [7]), ("b", 3, [8])]
    assert out.seqs[1].block_table == [2]  # b's 4th token still fits block 2
    s.update(out, {"a": 7, "b": 8})
    out = s.schedule()
    assert out.seqs[1].block_table == [2, 3]  # the 5th opens block 3, allocated before the step runs


def test_token_budget_chunks_long_prompt():
    s = make(budget=5)
    s.add(req("a", 12))
    chunks = []
    for _ in range(3):
        out = run_step(s)
        chunks.append([(x.start, len(x.token_ids), x.sample) for x in out.seqs])
    assert chunks == [[(0, 5, False)], [(5, 5, False)], [(10, 2, True)]]
    assert s.seqs["a"].output_token_ids == [7]


def test_running_decode_goes_before_new_prefill_chunk():
    s = make(budget=4)
    s.add(req("a", 2))
    run_step(s)
    s.add(req("b", 10))
    out = s.schedule()
    assert [(x.request_id, len(x.token_ids)) for x in out.seqs] == [("a", 1), ("b", 3)]


def test_no_chunking_waits_for_budget():
    s = make(budget=64, chunked=False)
    s.add(req("a", 40))
    s.add(req("b", 40))
    out = s.schedule()
    assert [x.request_id for x in out.seqs] == ["a"]


def test_max_num_seqs():
    s = make(max_seqs=2)
    for r in "abc":
        s.add(req(r, 2))
    assert [x.request_id for x in s.schedule().seqs] == ["a", "b"]


def test_queue_when_blocks_run_out_and_admit_after_finish():
    s = make(num_blocks=4, block_size=4)
    s.add(req("a", 12, max_tokens=1))
    s.add(req("b", 8, max_tokens=1))
    out = run_step(s)
    assert [x.request_id for x in out.seqs] == ["a"]  # b needs 2 blocks, 1 is free
    assert s.seqs.get("a") is None  # finished by max_tokens=1, blocks freed
    out = run_step(s)
    assert [x.request_id for x in out.seqs] == ["b"]
    assert s.blocks.num_free_blocks == 4


def test_preempts_newest_when_running_requests_cannot_grow():
    s = make(num_blocks=4, block_size=4)
    s.add(req("a", 8, max_tokens=10))
    s.add(req("b", 8, max_tokens=10, start=50))
    run_step(s)  # both prefilled: 4 blocks used; each sampled one token and needs a 3rd block now
    out = s.schedule()
    assert out.preempted == ["b"]
    assert [x.request_id for x in out.seqs] == ["a"]
    b = s.seqs["b"]
    assert b.block_table == [] and b.num_computed_tokens == 0 and s.waiting[0] is b
    assert b.output_token_ids == [7]  # kept: recomputed later from prompt + outputs
    s.update(out, {"a": 7})


def test_preempted_request_is_recomputed_and_both_complete():
    s = make(num_blocks=5, block_size=4)
    s.add(req("a", 8, max_tokens=6))
    s.add(req("b", 8, max_tokens=6, start=50))
    outputs = {}
    steps = 0
    while s.has_unfinished():
        out = s.schedule()
        for x in out.seqs:
            assert x.block_table == s.seqs[x.request_id].block_table[: len(x.block_table)]
        s.update(out, {x.request_id: 20 + x.num_output_tokens for x in out.seqs if x.sample})
        for r in ("a", "b"):
            if r in s.seqs:
                outputs[r] = s.seqs[r].output_token_ids
        steps += 1
        assert steps < 50
    assert s.num_preemptions >= 1
    assert s.blocks.num_free_blocks == 5 and all(r == 0 for r in s.blocks.pool.ref_cnt)


def test_a_lone_request_never_needs_preemption():
    # The pool bounds a request's total length, so one request alone always fits.
    s = make(num_blocks=2, block_size=4)
    s.add(req("a", 7, max_tokens=10))
    while s.has_unfinished():
        assert run_step(s).preempted == []
    assert s.num_preemptions == 0


def test_prefix_hit_counted_once_and_reused():
    s = make()
    s.add(req("a", 9, max_tokens=1))
    run_step(s)
    s.add(req("b", 9, max_tokens=1))
    out = s.schedule()
    (x,) = out.seqs
    assert (x.start, len(x.token_ids)) == (8, 1)
    assert s.seqs["b"].num_cached_tokens == 8
    assert (s.blocks.prefix_queries, s.blocks.prefix_hits) == (18, 8)


def test_finish_reasons_and_no_leaks():
    s = make()
    s.add(req("eos", 3, max_tokens=5))
    s.add(req("stopid", 3, max_tokens=5, stop_token_ids=(9,)))
    s.add(req("ign", 3, max_tokens=2, ignore_eos=True))
    seqs = dict(s.seqs)
    out = s.schedule()
    s.update(out, {"eos": 2, "stopid": 9, "ign": 2})
    out = s.schedule()
    s.update(out, {"ign": 2})
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
