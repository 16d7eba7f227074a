"""Async scheduling (step n+1 scheduled and queued before step n is collected) gives exactly the tokens, texts and
finish reasons of synchronous stepping, and frees exactly the blocks it should, on CPU: in one process and over
tensor-parallel rank processes (where the step really runs while the driver schedules the next). Also the
engine's per-step outputs are deltas, and the sampler's edge cases."""

import random

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig, RuntimeConfig

ASYNC = RuntimeConfig(async_scheduling=True)
SYNC = RuntimeConfig(async_scheduling=False)


def rand_prompts(lens, seed=5, vocab=384):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def run(model_dir, prompts, params, runtime, **kw):
    llm = LLM(model_dir, runtime=runtime, **kw)
    try:
        outs = llm.generate(prompts, params)
        assert llm.engine.num_free_blocks == llm.engine.num_blocks  # nothing leaked
        return [(o.token_ids, o.text, o.finish_reason) for o in outs], llm.engine.scheduler.num_preemptions
    finally:
        llm.shutdown()


def test_runtime_switch_resolves_per_device(monkeypatch):
    assert RuntimeConfig().resolved("cpu").async_scheduling is False
    assert RuntimeConfig().resolved("cuda:0").async_scheduling is True
    monkeypatch.setenv("KVRELAY_ASYNC_SCHEDULING", "1")
    assert RuntimeConfig(async_scheduling=False).resolved("cpu").async_scheduling is True
    monkeypatch.setenv("KVRELAY_ENFORCE_EAGER", "maybe")
    with pytest.raises(ValueError, match="KVRELAY_ENFORCE_EAGER='maybe'"):
        RuntimeConfig().resolved("cpu")


def test_async_equals_sync_greedy_and_seeded_with_every_stop_kind():
    d = "deploy/default_model"  # has a tokenizer: stop strings and EOS as a user meets them
    prompts = ["Return a list of", "The default value is", "def f(x):", "If the", "Raise"]
    params = [
        SamplingParams(max_tokens=40, temperature=0),  # EOS or length
        SamplingParams(max_tokens=40, temperature=0, stop=["."]),  # a stop string, seen one step late
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11),
        SamplingParams(max_tokens=30, temperature=1.0, top_k=20, seed=3, stop_token_ids=(16, 201)),
        SamplingParams(max_tokens=1, temperature=0),
    ]
    sync, _ = run(d, prompts, params, SYNC)
    asyn, _ = run(d, prompts, params, ASYNC)
    assert asyn == sync
    assert sync[1][2] == "stop" and "." not in sync[1][1]
    assert len(sync[4][0]) == 1 and sync[4][2] == "length"
    assert sync[3][2] == "stop" and sync[3][0][-1] in (16, 201)  # stopped on a stop id, which is kept


def test_async_equals_sync_under_preemption(llama_dir):
    prompts = rand_prompts([5, 30, 47, 70])
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref, _ = run(llama_dir, prompts, greedy, SYNC)
    for runtime in (SYNC, ASYNC):
        got, preemptions = run(llama_dir, prompts, greedy, runtime, block_size=8, num_blocks=24,
                               enable_prefix_caching=False)
        assert got == ref and preemptions > 0


def test_abort_under_lookahead_frees_exactly_its_blocks(llama_dir):
    eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, block_size=4, num_blocks=64, runtime=ASYNC))
    greedy = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    eng.add_request("a", list(range(10, 20)), greedy)  # 10 tokens: blocks 0-2
    eng.add_request("b", list(range(30, 35)), greedy)  # 5 tokens: blocks 3-4
    eng.step()  # prefill queued, nothing collected yet
    eng.step()  # decode queued; prefill collected
    pool = eng.scheduler.blocks.pool
    a_blocks = list(eng.scheduler.seqs["a"].block_table)
    assert a_blocks == [0, 1, 2] and eng.scheduler.num_inflight_steps == 1
    assert eng.abort_request("a")
    assert [pool.ref_cnt[b] for b in a_blocks] == [1, 1, 1]  # the step in flight still writes a's KV
    outs = eng.step()  # collects that step: a's token is dropped, its blocks return
    assert [o.request_id for o in outs if o.finished] == ["a"] and outs[0].finish_reason == "abort"
    assert all(o.new_token_ids == [] for o in outs if o.request_id == "a")
    assert [pool.ref_cnt[b] for b in a_blocks] == [0, 0, 0]
    assert eng.num_free_blocks == 64 - len(eng.scheduler.seqs["b"].block_table)
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.num_free_blocks == 64


def test_tensor_parallel_async_equals_single_process_with_preemption(llama_dir):
    prompts = rand_prompts([3, 17, 40, 70], seed=7)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref, _ = run(llama_dir, prompts, greedy, SYNC)
    got, preemptions = run(llama_dir, prompts, greedy, ASYNC, tensor_parallel_size=2, block_size=8, num_blocks=12)
    assert got == ref and preemptions > 0


def test_outputs_are_deltas_and_the_final_one_whole(llama_dir):
    eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, runtime=ASYNC))
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2))
    steps = []
    while eng.has_unfinished_requests():
        steps += eng.step()
    *middle, final = steps
    assert all(o.token_ids is None and o.prompt_token_ids is None and len(o.new_token_ids) == 1 for o in middle)
    assert [o.num_output_tokens for o in steps] == [1, 2, 3, 4, 5, 6]
    assert final.finished and final.prompt_token_ids == [5, 6, 7]
    assert final.token_ids == [t for o in steps for t in o.new_token_ids]
    assert [lp.token_id for lp in final.logprobs] == final.token_ids
    assert [lp for o in steps for lp in o.new_logprobs] == final.logprobs
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in final.logprobs)


def test_tiny_temperature_is_greedy_and_non_finite_values_are_rejected(llama_dir):
    llm = LLM(llama_dir)
    p = rand_prompts([9])
    greedy = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    tiny = llm.generate(p, SamplingParams(max_tokens=12, temperature=1e-38, ignore_eos=True))[0].token_ids
    assert tiny == greedy and len(set(greedy)) > 1
    for bad in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"top_p": float("nan")}):
        with pytest.raises(ValueError, match="temperature|top_p"):
            SamplingParams(**bad)
