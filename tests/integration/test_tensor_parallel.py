"""Tensor-parallel engine on CPU (gloo): TP=2 and TP=4 rank processes give the same greedy tokens as TP=1."""

import random

import pytest

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (3, 17, 40, 70)]


@pytest.fixture(scope="module")
def tp1_tokens(checkpoint_dir):
    out = {}
    for v in ("llama_gqa", "llama_mqa", "qwen2_bias", "llama_mha_tied"):
        out[v] = [o.token_ids for o in LLM(checkpoint_dir(v)).generate(prompts(), GREEDY)]
    return out


@pytest.mark.parametrize("variant, tp", [
    ("llama_gqa", 2),       # 2 KV heads split over 2 ranks
    ("llama_mqa", 2),       # 1 KV head replicated on both ranks
    ("qwen2_bias", 2),      # sharded q/k/v biases
    ("llama_mha_tied", 4),  # 4 heads over 4 ranks, tied vocab-parallel embedding / LM head
])
def test_tp_matches_single_process(checkpoint_dir, tp1_tokens, variant, tp):
    with LLM(checkpoint_dir(variant), tensor_parallel_size=tp, block_size=8, num_blocks=64) as llm:
        outs = llm.generate(prompts(), GREEDY)
        assert [o.token_ids for o in outs] == tp1_tokens[variant]
        # The scheduler, preemption and prefix cache work unchanged over ranks.
        again = llm.generate(prompts()[2], GREEDY)[0]
        assert again.num_cached_tokens == 32 and again.token_ids == tp1_tokens[variant][2]
        assert llm.engine.num_free_blocks == 64


def test_tp_rejects_unsplittable_model(llama_dir):
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) is not divisible by tensor_parallel_size 3"):
        LLM(llama_dir, tensor_parallel_size=3)
