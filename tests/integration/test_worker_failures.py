"""Workers dying under the router (in one process, no Ray): a request whose prefill worker is gone is retried on
another one, invisibly to the client; with no prefill worker left, requests fail fast with UNAVAILABLE; a decode
group dying mid-stream ends its streams with UNAVAILABLE, never a hang."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from client import Client, KvrelayError
from decode_workers.group import DecodeLeader
from engine import LLM, EngineConfig, SamplingParams
from prefill_workers.worker import PrefillWorker
from router.config import RouterConfig
from router.server import RouterServer
from router.workers import WorkerSpec

GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def system(llama_dir):
    cfg = EngineConfig.from_model_dir(llama_dir, num_blocks=64, max_model_len=256)
    prefill = [PrefillWorker(f"p{i}", cfg) for i in range(2)]
    decode = DecodeLeader("d0", cfg)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = RouterServer(RouterConfig(host="127.0.0.1", port=0, load_poll_interval_s=0.05), cfg.model,
                          [WorkerSpec(w.name, w.address) for w in prefill], [WorkerSpec("d0", decode.address)])
    port = asyncio.run_coroutine_threadsafe(router.start(256, 60), loop).result(90)
    client = Client(f"127.0.0.1:{port}", timeout=30)
    yield prefill, decode, router, client
    client.close()
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    for w in prefill:
        w.stop()
    decode.stop()


def wait_free(decode: DecodeLeader, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while decode.loop.stats.free_blocks != decode.loop.stats.num_blocks or decode.loop.stats.remote:
        assert time.monotonic() < deadline, decode.loop.stats
        time.sleep(0.02)


def test_dead_prefill_worker_is_retried_elsewhere_then_unavailable(system, llama_dir):
    prefill, decode, router, client = system
    prompts = [[3 + i, 40, 41, 42, 43] * 3 for i in range(4)]
    refs = LLM(llama_dir, max_model_len=256).generate(prompts, SamplingParams(**GREEDY))
    prefill[0].stop()  # dies: its server is gone and its KV channels closed
    for prompt, ref in zip(prompts, refs):  # some land on p0 first (the router does not know yet): retried
        assert client.generate(prompt, **GREEDY).token_ids == ref.token_ids
    p0 = router.pool.prefill[0]
    assert not p0.view.healthy and "unreachable" in p0.error
    wait_free(decode)
    prefill[1].stop()
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        client.generate(prompts[0], **GREEDY)
    assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 10
    wait_free(decode)


def test_decode_group_dying_mid_stream_ends_the_stream(system):
    prefill, decode, router, client = system
    s = client.stream([5, 6, 7, 8], max_tokens=240, temperature=0.0, ignore_eos=True)
    it = iter(s)
    next(it)
    decode.server.stop(grace_s=0)  # gone at once, mid-stream (no grace period to finish its requests)
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        list(it)
    assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 10, e.value
    deadline = time.monotonic() + 10
    while prefill[0].loop.stats.free_blocks != prefill[0].loop.stats.num_blocks:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_broken_kv_channel_is_rewired_and_the_request_retried(system, llama_dir):
    prefill, decode, router, client = system
    prompt = [9, 10, 11, 12] * 4
    (ref,) = LLM(llama_dir, max_model_len=256).generate([prompt], SamplingParams(**GREEDY))

    def break_channels(eng):  # both workers live on, but their KV channels to d0 are gone
        for ch in eng.executor.extension.out["d0"].values():
            ch.channel.close()

    for w in prefill:
        w.loop.call(break_channels).result(10)
    for _ in range(2):  # whichever worker it lands on: the failed transfer is retried after re-wiring
        assert client.generate(prompt, **GREEDY).token_ids == ref.token_ids
    assert all(w.view.healthy for w in router.pool.prefill)
    wait_free(decode)
