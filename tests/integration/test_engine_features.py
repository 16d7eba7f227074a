"""Cache equivalences and sampling features of the single-process engine (CPU, float32)."""

import random

import pytest

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def rand_prompts(lens, seed=1, vocab=384):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Greedy tokens with a roomy pool, no prefix caching, no chunking: the baseline the features must equal."""
    llm = LLM(llama_dir, enable_prefix_caching=False, enable_chunked_prefill=False)
    ps = rand_prompts([5, 30, 47, 70, 133])
    return ps, [o.token_ids for o in llm.generate(ps, GREEDY)]


def test_cached_decoding_equals_full_recompute(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir, enable_prefix_caching=False)
    prompt, out = ps[1], ref[1]
    # Token i must be what a fresh, uncached prefill of prompt + out[:i] predicts.
    steps = [prompt + out[:i] for i in range(len(out))]
    fresh = llm.generate(steps, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert [o.token_ids[0] for o in fresh] == out


def test_prefix_cache_hits_give_same_tokens(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir, block_size=16)
    first = llm.generate(ps[4], GREEDY)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(ps[4], GREEDY)[0]
    assert again.num_cached_tokens == 128  # 8 full blocks of the 133-token prompt
    assert again.token_ids == first.token_ids == ref[4]
    # A new prompt sharing the first 64 tokens reuses 4 blocks and still decodes like an uncached run.
    shared = ps[4][:64] + ps[0]
    out = llm.generate(shared, GREEDY)[0]
    assert out.num_cached_tokens == 64
    base = LLM(llama_dir, enable_prefix_caching=False).generate(shared, GREEDY)[0]
    assert out.token_ids == base.token_ids
    assert llm.engine.prefix_cache_hit_rate > 0


def test_chunked_prefill_gives_same_tokens(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir, max_num_batched_tokens=24, enable_prefix_caching=False)
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == ref


def test_preemption_under_tiny_pool_gives_same_tokens(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir, block_size=8, num_blocks=24, enable_prefix_caching=False)
    outs = llm.generate(ps, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert llm.engine.num_free_blocks == 24


def test_preemption_with_prefix_cache_gives_same_tokens(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir, block_size=8, num_blocks=24, max_num_batched_tokens=40)
    outs = llm.generate(ps, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref


def test_seeded_sampling_same_alone_or_batched(llama_dir):
    ps = rand_prompts([9, 33, 60], seed=3)
    p = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    llm = LLM(llama_dir)
    alone = llm.generate(ps[1], p)[0].token_ids
    others = [SamplingParams(max_tokens=15, temperature=0.7, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]
    batched = llm.generate([ps[0], ps[1], ps[2]], [others[0], p, others[1]])[1].token_ids
    assert alone == batched
    small = LLM(llama_dir, block_size=8, num_blocks=24)  # with preemptions too
    assert small.generate([ps[0], ps[1], ps[2]], [others[0], p, others[1]])[1].token_ids == alone
    differs = llm.generate(ps[1], SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=99,
                                                   ignore_eos=True))[0].token_ids
    assert differs != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir)
    k1 = llm.generate(ps[:3], SamplingParams(max_tokens=24, temperature=0.8, top_k=1, ignore_eos=True))
    p0 = llm.generate(ps[:3], SamplingParams(max_tokens=24, temperature=1.3, top_p=1e-6, ignore_eos=True))
    assert [o.token_ids for o in k1] == ref[:3] == [o.token_ids for o in p0]


def test_sampling_respects_top_k(llama_dir):
    llm = LLM(llama_dir)
    prompt = rand_prompts([12], seed=5)[0]
    lp = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0].logprobs[0]
    allowed = {t for t, _ in lp.top}
    for seed in range(20):
        tok = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=seed))[0]
        assert tok.token_ids[0] in allowed


def test_logprobs_are_consistent(llama_dir, reference):
    ps, ref = reference
    out = LLM(llama_dir).generate(ps[2], SamplingParams(max_tokens=6, temperature=0, logprobs=4,
                                                        ignore_eos=True))[0]
    assert out.token_ids == ref[2][:6] and len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 4
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:])) and lp.logprob <= 0


def test_eos_stop_token_ids_and_max_tokens(llama_dir, reference):
    ps, ref = reference
    llm = LLM(llama_dir)
    out = ref[1]
    stop_at = out[5]
    first = out.index(stop_at)
    r = llm.generate(ps[1], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_at]))[0]
    assert r.token_ids == out[: first + 1] and r.finish_reason == "stop"
    r = llm.generate(ps[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert r.token_ids == out[:3] and r.finish_reason == "length"


def test_stop_strings_cut_text_and_stream_consistently(llama_dir):
    llm = LLM(llama_dir)
    eng = llm.engine
    prompt = "The quick brown fox"
    full = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert full.text == llm.tokenizer.decode(full.token_ids)
    stop = full.text[10:13]
    assert len(stop) == 3
    eng.add_request("s", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while eng.has_unfinished_requests():
        for o in eng.step():
            streamed += o.new_text
            final = o
    assert final.finished and final.finish_reason == "stop"
    assert final.text == full.text[: full.text.index(stop)] == streamed
    assert stop not in streamed


def test_abort_frees_blocks(llama_dir):
    llm = LLM(llama_dir)
    eng = llm.engine
    eng.add_request("a", rand_prompts([50])[0], SamplingParams(max_tokens=100, ignore_eos=True))
    eng.add_request("b", rand_prompts([20])[0], SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.num_free_blocks < eng.num_blocks
    assert eng.abort_request("a") and not eng.abort_request("nope")
    outs = eng.step()
    assert any(o.request_id == "a" and o.finish_reason == "abort" and o.finished for o in outs)
    eng.abort_request("b")
    eng.step()
    assert not eng.has_unfinished_requests()
    assert eng.num_free_blocks == eng.num_blocks


def test_bad_requests_raise_and_leave_engine_usable(llama_dir, tmp_path):
    llm = LLM(llama_dir, max_model_len=256)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="at most 255 fit"):
        llm.generate([[5] * 256], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 384]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len 1000 exceeds"):
        LLM(llama_dir, max_model_len=1000)
    with pytest.raises(ValueError, match="empty"):  # the first, valid prompt was queued: it must be withdrawn
        llm.generate([[5, 6], []], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == llm.engine.num_blocks
    assert llm.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"
