"""Tensor parallelism over NCCL and KV transfer between GPUs. Skipped with fewer than 2 (or 3) GPUs."""

import random

import pytest
import torch

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
KV = 1 << 30


def gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 384) for _ in range(k)] for k in (4, 17, 64, 133)]


pytestmark = pytest.mark.gpu


@gpus(2)
def test_tp2_nccl_matches_tp1(llama_dir):
    ref = [o.token_ids for o in LLM(llama_dir, device="cuda", kv_cache_memory=KV).generate(prompts(), GREEDY)]
    with LLM(llama_dir, device="cuda", tensor_parallel_size=2, kv_cache_memory=KV) as llm:
        assert [o.token_ids for o in llm.generate(prompts(), GREEDY)] == ref


@pytest.mark.parametrize("decode_tp", [1, pytest.param(2, marks=gpus(3))])
@gpus(2)
def test_kv_transfer_over_nccl(llama_dir, decode_tp):
    from kv_helpers import disaggregated_generate, engine, wire

    ref = [o.token_ids for o in LLM(llama_dir, device="cuda", kv_cache_memory=KV).generate(prompts(), GREEDY)]
    p = engine(llama_dir, device="cuda:0", kv_cache_memory=KV)
    d = engine(llama_dir, tp=decode_tp, device="cuda:1", kv_cache_memory=KV)
    try:
        wire(p, "p0", d, "d0")
        outs = disaggregated_generate(p, d, prompts(), GREEDY)
        assert [outs[f"req{i}"].token_ids for i in range(4)] == ref
        assert d.num_free_blocks == d.num_blocks and p.num_free_blocks == p.num_blocks
    finally:
        p.shutdown()
        d.shutdown()
