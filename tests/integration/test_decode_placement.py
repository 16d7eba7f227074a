"""Where the router places a prompt's KV (in one process, no Ray): a burst spreads over the decode groups (a
placement counts the moment it is chosen, not when its reservation answers), and a prompt whose prefix a decode
group already holds goes to that group, which then receives only the blocks it lacks. Tokens equal LLM's."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import Client
from decode_workers.group import DecodeLeader
from engine import LLM, EngineConfig, SamplingParams
from prefill_workers.worker import PrefillWorker
from router.config import RouterConfig
from router.server import RouterServer
from router.workers import WorkerSpec

SECRET = "placement-test"
GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def system(llama_dir):
    # The engines on threads of this process (RuntimeConfig.engine_process off): the tests read their scheduler's
    # and KV connector's counters directly.
    cfg = EngineConfig.from_model_dir(llama_dir, num_blocks=64, max_model_len=256)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRELAY_ENGINE_PROCESS", "0")
        prefill = PrefillWorker("p0", cfg, secret=SECRET)
        decode = [DecodeLeader(f"d{i}", cfg, secret=SECRET) for i in range(2)]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=0, stats_log_interval_s=0), cfg.model,
                          [WorkerSpec("p0", prefill.address)], [WorkerSpec(d.name, d.address) for d in decode],
                          secret=SECRET)
    port = asyncio.run_coroutine_threadsafe(router.start(256, 60), loop).result(90)
    yield prefill, decode, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    prefill.stop()
    for d in decode:
        d.stop()


def reserved_tokens(d: DecodeLeader) -> int:
    """Prompt tokens the group has reserved KV for so far (its prefix-cache queries count every reservation)."""
    return d.engine.scheduler.blocks.prefix_queries


def test_a_burst_spreads_over_decode_groups(system, llama_dir):
    prefill, decode, target = system
    prompts = [[10 + i] * 20 for i in range(8)]  # no shared prefix: nothing but load to rank by
    long = dict(GREEDY, max_tokens=32)  # long enough that the burst's requests are all in flight together
    ref = [o.token_ids for o in LLM(llama_dir, max_model_len=256).generate(prompts, SamplingParams(**long))]
    before = [reserved_tokens(d) for d in decode]

    def one(p):
        with Client(target, timeout=60) as c:
            return c.generate(p, **long).token_ids

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, prompts)) == ref
    got = [(reserved_tokens(d) - b) // 20 for d, b in zip(decode, before)]  # requests each group reserved for
    # Counted when chosen, a placement steers the next one elsewhere: no group takes the burst alone (before, all
    # eight landed on the first group, whose count rose only once its reservations answered).
    assert sum(got) == 8 and min(got) >= 3, got


def test_a_held_prefix_picks_its_group_and_only_missing_blocks_travel(system, llama_dir):
    prefill, decode, target = system
    shared = [(7 * i) % 300 + 3 for i in range(64)]  # 4 blocks of 16
    a, b = shared + [5, 6, 7], shared + [8, 9, 10, 11]
    ref = [o.token_ids for o in LLM(llama_dir, max_model_len=256).generate([a, b], SamplingParams(**GREEDY))]
    def bytes_sent() -> int:  # asked on the prefill worker's engine loop, the only thread touching its engine
        return prefill.loop.call(lambda eng: eng.call_extension("stats")[0]["bytes_sent"]).result(10)

    with Client(target, timeout=60) as c:
        before = [reserved_tokens(d) for d in decode]
        assert c.generate(a, **GREEDY).token_ids == ref[0]
        holder, other = sorted(decode, key=lambda d: reserved_tokens(d) - before[decode.index(d)], reverse=True)
        sent, held, other_before = bytes_sent(), reserved_tokens(holder), reserved_tokens(other)
        out = c.generate(b, **GREEDY)
    assert out.token_ids == ref[1]
    assert out.usage.decode_cached_prompt_tokens == 64
    assert reserved_tokens(holder) - held == len(b) and reserved_tokens(other) == other_before
    # Only the 5th block travelled: every layer's K and V of one block.
    assert bytes_sent() - sent == prefill.loop.engine.executor.runner.kv_block_bytes
