"""Migration, token-exact (in one process, no Ray): a decode group lost mid-stream moves each of its requests to
another group as prompt + the tokens already streamed, and the client's stream goes on with no token repeated or
missing, greedy and seeded alike (the sampling noise continues at the streamed tokens' output index)."""

from __future__ import annotations

import pytest
from local_system import start_local

from engine import LLM, SamplingParams

GREEDY = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


@pytest.fixture()
def system(llama_dir):
    s = start_local(llama_dir, num_prefill=1, num_decode=2)
    yield s
    s.stop()


def test_output_offset_continues_a_seeded_stream(llama_dir):
    """The engine half: prompt + k streamed tokens, with output_offset k, samples the rest of the unfailed run."""
    llm = LLM(llama_dir, max_model_len=256)
    prompt = [5, 6, 7, 8, 9]
    (full,) = llm.generate([prompt], SamplingParams(**SEEDED))
    k = 13
    (rest,) = llm.generate([prompt + full.token_ids[:k]], SamplingParams(**{**SEEDED, "max_tokens": 40 - k},
                                                                         output_offset=k))
    assert rest.token_ids == full.token_ids[k:]


@pytest.mark.parametrize("kw", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_stream_continues_exactly_on_another_group(system, llama_dir, kw):
    prompt = [5, 6, 7, 8, 9]
    (ref,) = LLM(llama_dir, max_model_len=256).generate([prompt], SamplingParams(**kw))
    it = iter(system.client.stream(prompt, **kw))
    got = list(next(it).token_ids)
    lost = next(d for d in [system.decode, *system.more_decode] if d.loop.stats.running or d.loop.stats.remote)
    lost.server.stop(grace_s=0)  # gone mid-stream
    for chunk in it:
        got.extend(chunk.token_ids)
    assert got == ref.token_ids
    m = system.router.metrics
    assert m.registry.get_sample_value("kvrelay:request_migrations_total", {"model_name": m.model_name}) == 1
