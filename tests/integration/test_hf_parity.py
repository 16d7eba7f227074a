"""Greedy decoding equals HuggingFace transformers token for token, for every supported architecture/feature."""

import random

import pytest

from checkpoints import hf_greedy
from conftest import VARIANTS
from engine import LLM, SamplingParams

PROMPT_LENS = [1, 7, 16, 17, 64, 133]  # crossing block boundaries (block size 16 and 8)
MAX_TOKENS = 24


def prompts(vocab: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf(checkpoint_dir, variant):
    path = checkpoint_dir(variant)
    ps = prompts()
    block_size = 8 if variant in ("llama_mqa", "qwen2_bias") else 16
    llm = LLM(path, dtype="float32", block_size=block_size)
    outs = llm.generate(ps, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    ref = hf_greedy(path, ps, MAX_TOKENS)
    for n, o, r in zip(PROMPT_LENS, outs, ref):
        assert o.token_ids == r, f"{variant}: prompt of {n} tokens diverges from HF"
        assert o.finish_reason == "length"
    assert llm.engine.num_free_blocks == llm.engine.num_blocks  # nothing leaked


def test_sharded_safetensors(tmp_path):
    from checkpoints import make_checkpoint

    path = make_checkpoint(str(tmp_path / "sharded"), "llama", tokenizer=False)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(str(tmp_path / "sharded2"), max_shard_size="100KB")
    assert (tmp_path / "sharded2" / "model.safetensors.index.json").exists()
    ps = prompts()[:3]
    a = LLM(path).generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    b = LLM(str(tmp_path / "sharded2")).generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
