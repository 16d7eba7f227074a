"""The whole serving system on GPUs (Ray actors, one GPU each; KV over NCCL): the tokens equal single-process
`LLM` greedy output on the same GPU type, in float32. Skipped without enough GPUs or without Ray."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
PROMPTS = ["Return a list of", "The default value is", "If the file does not exist,", "Raise a ValueError"]


def gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


@pytest.fixture(scope="module")
def reference():
    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32", device="cuda", max_model_len=512, kv_cache_memory=1 << 28)
    return llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))


def check(served, reference):
    from client import Client

    def one(prompt):
        with Client(served.target, timeout=120) as c:
            return c.generate(prompt, max_tokens=24, temperature=0.0)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(one, PROMPTS))
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert [o.text for o in outs] == [r.text for r in reference]
    served.wait_all_free()


@pytest.mark.parametrize("prefill,groups,tp", [
    pytest.param(0, 1, 1, marks=gpus(1), id="aggregated-1gpu"),
    pytest.param(1, 1, 1, marks=gpus(2), id="1prefill-1decode-2gpus"),
    pytest.param(1, 1, 2, marks=gpus(3), id="1prefill-decode-tp2-3gpus"),
])
def test_serving_on_gpus(reference, prefill, groups, tp):
    pytest.importorskip("ray")
    from serving import start_serving

    served = start_serving(device="cuda", prefill_workers=prefill, decode_groups=groups, decode_tp=tp,
                           prefill_num_blocks=256, decode_num_blocks=256, max_num_seqs=16, max_queued_requests=64)
    try:
        check(served, reference)
    finally:
        served.stop()
