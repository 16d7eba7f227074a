"""Aggregated serving behind the same router (no prefill workers: each decode group prefills and decodes whole
requests): the baseline the disaggregated system is compared against. In one process, no Ray."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from client import Client, KvrelayError
from decode_workers.group import DecodeLeader
from engine import LLM, EngineConfig, SamplingParams
from router.config import RouterConfig
from router.server import RouterServer
from router.workers import WorkerSpec

SECRET = "aggregated-test-secret"


@pytest.fixture(scope="module")
def aggregated(llama_dir):
    cfg = EngineConfig.from_model_dir(llama_dir, num_blocks=64, max_model_len=256, max_num_seqs=2)
    groups = [DecodeLeader(f"g{i}", cfg, secret=SECRET) for i in range(2)]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=0), cfg.model, [],
                          [WorkerSpec(g.name, g.address) for g in groups], secret=SECRET)
    port = asyncio.run_coroutine_threadsafe(router.start(256, 60), loop).result(90)
    yield groups, router, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    for g in groups:
        g.stop()


def wait_idle(groups, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while any(g.loop.stats.free_blocks != g.loop.stats.num_blocks or g.loop.stats.running for g in groups):
        assert time.monotonic() < deadline, [g.loop.stats for g in groups]
        time.sleep(0.02)


def test_concurrent_requests_equal_llm_and_use_both_groups(aggregated, llama_dir):
    groups, router, target = aggregated
    prompts = [[3 + i, 50, 51, 52] * (2 + i) for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    refs = LLM(llama_dir, max_model_len=256).generate(prompts, params)
    steps0 = [g.loop.stats.steps for g in groups]

    def one(p):
        with Client(target, timeout=60) as c:
            return c.generate(p, max_tokens=12, temperature=0.0, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # 6 requests, 2 seats per group: some wait in line
        outs = list(pool.map(one, prompts))
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert all(o.usage.completion_tokens == 12 and o.timings.first_token_ms > 0 for o in outs)
    assert all(g.loop.stats.steps > s for g, s in zip(groups, steps0))  # load spread over both groups
    info = Client(target).model_info()
    assert (info.prefill_workers, info.decode_groups) == (0, 2)
    wait_idle(groups)


def test_shared_prefix_goes_to_the_group_that_has_it(aggregated):
    groups, router, target = aggregated
    system = [7, 8, 9, 10] * 12  # 48 tokens: 3 full blocks
    with Client(target, timeout=60) as c:
        a = c.generate(system + [11, 12], max_tokens=4, temperature=0.0)
        b = c.generate(system + [13, 14, 15], max_tokens=4, temperature=0.0)
    assert a.usage.cached_prompt_tokens == 0 and b.usage.cached_prompt_tokens == 48


def test_cancel_frees_the_group(aggregated):
    groups, router, target = aggregated
    with Client(target, timeout=60) as c:
        s = c.stream([5, 6, 7], max_tokens=200, temperature=0.0, ignore_eos=True)
        it = iter(s)
        next(it)
        s.cancel()
        with pytest.raises(KvrelayError):
            list(it)
    wait_idle(groups)
