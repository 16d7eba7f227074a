"""Mixed steps: decode rows next to fresh prompts and prompt chunks in one step. Their decode rows attend apart
from the rest (engine.runner `_torch_metadata` parts; the Triton decode kernel on CUDA), and every request's
tokens are exactly those it gets alone."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.runner import ModelRunner

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [40, 41, 42] * 5, "c": [3 + i for i in range(70)],
           "d": [21, 22, 23, 24]}


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def run(llama_dir: str, staggered: bool, device: str) -> dict[str, list[int]]:
    # A 32-token budget: "c" (70 tokens) is prefilled in chunks next to the others' decodes.
    eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, dtype="float32", device=device, num_blocks=64,
                                                max_model_len=256, max_num_batched_tokens=32))
    tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    # Staggered: "a" first; three steps later "b", "c" and "d" at once, so one step holds a's decode next to
    # several prompts and a chunk (rows of the rest with different batch slots).
    waves = [["a"], ["b", "c", "d"]] if staggered else [list(PROMPTS)]
    steps = 0
    while waves or eng.has_unfinished_requests():
        if waves and steps % 3 == 0:
            for rid in waves.pop(0):
                eng.add_request(rid, PROMPTS[rid], GREEDY)
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
    eng.shutdown()
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_steps_give_each_request_its_tokens_alone(llama_dir, monkeypatch, device):
    parts: list[int] = []
    original = ModelRunner._torch_metadata

    def spy(self, out, inp):
        meta = original(self, out, inp)
        parts.append(len(meta.parts) if meta.parts else 1)
        return meta

    alone = {}
    for rid, prompt in PROMPTS.items():
        eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, dtype="float32", device=device, num_blocks=64,
                                                    max_model_len=256))
        eng.add_request(rid, prompt, GREEDY)
        while eng.has_unfinished_requests():
            for out in eng.step():
                alone.setdefault(rid, []).extend(out.new_token_ids)
        eng.shutdown()
    monkeypatch.setattr(ModelRunner, "_torch_metadata", spy)
    mixed = run(llama_dir, staggered=True, device=device)
    assert mixed == alone
    assert all(len(t) == 12 for t in mixed.values())
    assert parts.count(2) >= 3, parts  # steps that were split into decode rows and the rest

