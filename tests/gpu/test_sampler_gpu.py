"""The sync-free sampler and async scheduling on a CUDA GPU: the Triton draw reproduces the torch reference's
noise bit for bit, a sampled batched decode under async scheduling synchronises the host only to read each step's
tokens, and async on equals async off on the GPU. Skipped without a GPU."""

import random

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig, RuntimeConfig
from engine.runner import PendingStep
from engine.sampler import Sampler, SamplingBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KV = 1 << 30


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def batch(n, device, seed=0):
    """Rows reading a persistent batch of 2n slots, in a shuffled order, as the runner hands them over."""
    g = torch.Generator().manual_seed(seed)
    temp = torch.tensor([0.0, 0.8, 1.0, 1.3, 0.5, 0.0, 0.7, 2.0] * 64)[:n]
    top_k = torch.tensor([0, 0, 40, 0, 5, 3, 0, 100] * 64)[:n]
    top_p = torch.tensor([1.0, 0.95, 1.0, 0.9, 1.0, 0.5, 0.8, 1.0] * 64)[:n]
    slots = torch.randperm(2 * n, generator=g)[:n]
    fparams, iparams = torch.zeros(2, 2 * n), torch.zeros(2, 2 * n, dtype=torch.int64)
    fparams[0, slots], fparams[1, slots], iparams[0, slots] = temp, top_p, top_k
    iparams[1, slots] = torch.randint(0, 2**62, (n,), generator=g)
    return SamplingBatch(all_greedy=False, max_logprobs=None, slots=slots.to(device),
                         output_index=torch.randint(0, 1000, (n,), generator=g).to(device),
                         float_params=fparams.to(device), int_params=iparams.to(device))


@pytest.mark.parametrize("n", [1, 8, 40, 300])  # up to 255 rows: the first round split over the vocabulary
def test_triton_draw_equals_torch_reference(n):
    logits = torch.randn(n, 50000, generator=torch.Generator().manual_seed(n)) * 3
    for seed in range(8):
        cpu = Sampler()(logits, batch(n, "cpu", seed)).token_ids
        gpu = Sampler()(logits.cuda(), batch(n, "cuda", seed)).token_ids.cpu()
        assert torch.equal(cpu, gpu)
        assert cpu[0] == logits[0].argmax()  # row 0 is greedy: top-k/top-p aside
        if n > 5:
            assert cpu[5] == logits[5].argmax()


def prompts(n, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randrange(4, 60))] for _ in range(n)]


def test_sampled_decode_syncs_only_to_read_tokens(llama_dir, monkeypatch):
    eng = LLMEngine(EngineConfig.from_model_dir(llama_dir, device="cuda", kv_cache_memory=KV,
                                                runtime=RuntimeConfig(async_scheduling=True)))
    for i, p in enumerate(prompts(12)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, top_k=50,
                                                   seed=i if i % 3 else None, ignore_eos=True,
                                                   logprobs=2 if i == 4 else None))
    for _ in range(4):  # prefill and the first decodes, outside the check
        eng.step()
    reads = []
    result = PendingStep.result

    def allowed(self):  # the one host synchronisation a step may make: waiting for its tokens
        reads.append(1)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return result(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(PendingStep, "result", allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(reads) == 20  # one collected step per step() call


def test_async_equals_sync_on_gpu(llama_dir):
    ps = prompts(16, seed=9)
    params = [SamplingParams(max_tokens=30, temperature=0 if i % 2 else 0.9, top_p=0.95, seed=i, stop_token_ids=(7,))
              for i in range(16)]
    outs = {}
    for mode in (False, True):
        llm = LLM(llama_dir, device="cuda", kv_cache_memory=KV, runtime=RuntimeConfig(async_scheduling=mode))
        outs[mode] = [(o.token_ids, o.finish_reason) for o in llm.generate(ps, params)]
        assert llm.engine.num_free_blocks == llm.engine.num_blocks
        del llm
    assert outs[True] == outs[False]
