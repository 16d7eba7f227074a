"""Workers dying under the router (in one process, no Ray): a request whose prefill worker is gone is retried on
another one, invisibly to the client; with no prefill worker left, requests fail fast with UNAVAILABLE and a
one-line cause, and health says NOT_SERVING until a worker is back; a decode group dying mid-stream with no other
to migrate to ends its streams with UNAVAILABLE and a one-line cause (the traceback goes to the log only), never a
hang."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from local_system import start_local

from client import KvrelayError
from engine import LLM, SamplingParams

GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture()
def in_process(monkeypatch):
    """The workers' engines on threads of this process (RuntimeConfig.engine_process off), for a test that
    reaches into an engine (its executor, its KV channels), which an engine core process would keep apart."""
    monkeypatch.setenv("KVRELAY_ENGINE_PROCESS", "0")


@pytest.fixture()
def system(llama_dir, request):
    """poll_interval_s from the test's parametrization (indirect), else 0.05 s; in-process engines for a test
    that asks for `in_process` too."""
    if "in_process" in request.fixturenames:
        request.getfixturevalue("in_process")
    s = start_local(llama_dir, poll_interval_s=getattr(request, "param", 0.05))
    yield s
    s.stop()


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(target: str, status: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(target) != status:
        assert time.monotonic() < deadline, f"health did not become {status}"
        time.sleep(0.02)


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 600, message


# A 30 s poll: the router learns of the dead worker only from the failed call, so the retry must happen.
@pytest.mark.parametrize("system", [30.0], indirect=True)
def test_dead_prefill_worker_is_retried_elsewhere_then_unavailable(system, llama_dir):
    prompts = [[3 + i, 40, 41, 42, 43] * 3 for i in range(4)]
    refs = LLM(llama_dir, max_model_len=256).generate(prompts, SamplingParams(**GREEDY))
    system.prefill[0].stop()  # dies: its server is gone and its KV channels closed
    for prompt, ref in zip(prompts, refs):  # the first goes to p0 (ties go by name): retried on p1
        assert system.client.generate(prompt, **GREEDY).token_ids == ref.token_ids
    assert system.retries() == 1  # once: the failed call marked p0 down, the rest went to p1 directly
    p0 = system.router.pool.prefill[0]
    assert not p0.view.healthy and "unreachable" in p0.error
    system.wait_free()
    system.prefill[1].stop()
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        system.client.generate(prompts[0], **GREEDY)
    assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 10
    assert "no healthy prefill worker" in e.value.details
    assert_one_line(e.value.details)
    system.wait_free()


def test_no_capacity_is_not_serving_until_a_worker_returns(system, llama_dir):
    prompt = [7, 8, 9, 10] * 4
    (ref,) = LLM(llama_dir, max_model_len=256).generate([prompt], SamplingParams(**GREEDY))
    assert health(system.target) == SERVING
    for w in system.prefill:
        w.stop()
    wait_health(system.target, NOT_SERVING)
    with pytest.raises(KvrelayError) as e:
        system.client.generate(prompt, **GREEDY)
    assert e.value.code == "UNAVAILABLE" and "no healthy prefill worker" in e.value.details
    assert "p0 is unreachable" in e.value.details and "p1 is unreachable" in e.value.details
    assert_one_line(e.value.details)
    system.restart_prefill(1)  # back on p1's address, with no KV channels yet
    wait_health(system.target, SERVING)
    retries = system.retries()
    # Its first prefill finds the pair unwired (FAILED_PRECONDITION): the router re-wires it and retries.
    assert system.client.generate(prompt, **GREEDY).token_ids == ref.token_ids
    assert system.retries() == retries + 1
    system.wait_free()


def test_decode_engine_failing_mid_stream_sends_a_one_line_cause(in_process, system):
    s = system.client.stream([5, 6, 7, 8], max_tokens=240, temperature=0.0, ignore_eos=True)
    it = iter(s)
    next(it)

    def rank_gone(*args, **kwargs):  # what the executor raises when a tensor-parallel rank has died
        raise RuntimeError("decode rank 1 is gone")

    system.decode.engine.executor.submit = rank_gone  # the engine's next step fails, as with a SIGKILLed rank
    with pytest.raises(KvrelayError) as e:
        list(it)
    assert e.value.code == "UNAVAILABLE", e.value
    # It would migrate, but no decode group is left (and none is restarting: no supervisor here).
    assert e.value.details == "no healthy decode group (engine failed: RuntimeError: decode rank 1 is gone)"
    wait_health(system.target, NOT_SERVING)  # the group reports itself unhealthy: no decode capacity left
    with pytest.raises(KvrelayError) as e:
        system.client.generate([5, 6, 7, 8], **GREEDY)
    assert e.value.code == "UNAVAILABLE" and "no healthy decode group" in e.value.details
    assert "RuntimeError: decode rank 1 is gone" in e.value.details
    assert_one_line(e.value.details)


def test_decode_group_dying_mid_stream_ends_the_stream(system):
    s = system.client.stream([5, 6, 7, 8], max_tokens=240, temperature=0.0, ignore_eos=True)
    it = iter(s)
    next(it)
    system.decode.server.stop(grace_s=0)  # gone at once, mid-stream (no grace period to finish its requests)
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        list(it)
    assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 10, e.value
    assert_one_line(e.value.details)
    p0 = system.prefill[0].loop.stats
    deadline = time.monotonic() + 10
    while p0.free_blocks != p0.num_blocks:
        assert time.monotonic() < deadline
        time.sleep(0.02)
        p0 = system.prefill[0].loop.stats
    wait_health(system.target, NOT_SERVING)


@pytest.mark.parametrize("system", [30.0], indirect=True)
def test_broken_kv_channel_is_rewired_and_the_request_retried(in_process, system, llama_dir):
    prompt = [9, 10, 11, 12] * 4
    (ref,) = LLM(llama_dir, max_model_len=256).generate([prompt], SamplingParams(**GREEDY))

    def break_channels(eng):  # both workers live on, but their KV channels to d0 are gone
        for ch in eng.executor.extension.out["d0"].values():
            ch.channel.close()

    for w in system.prefill:
        w.loop.call(break_channels).result(10)
    for _ in range(2):  # the first lands on p0 (ties go by name): its transfer fails, p0-d0 is re-wired, retried
        assert system.client.generate(prompt, **GREEDY).token_ids == ref.token_ids
        assert system.retries() == 1  # the second found p0's channels re-wired
    assert all(w.view.healthy for w in system.router.pool.prefill)
    system.wait_free()


def _hold_after_layer_0(worker: object, marker: str) -> tuple:
    """In a prefill worker's in-process engine: the step that sends `marker`'s KV stops after layer 0 was sent,
    until released. Returns (gate, hit, original hook)."""
    import threading

    ext = worker.engine.executor.extension
    gate, hit, original = threading.Event(), threading.Event(), ext.on_layer

    def on_layer(layer: int) -> None:
        original(layer)
        if layer == 0 and any(rid.startswith(marker) for step in ext.step_sends for rid in step.request_ids):
            hit.set()
            gate.wait(30)

    ext.on_layer = on_layer
    return gate, hit, original


def test_cancel_mid_prefill_frees_blocks_on_both_sides(in_process, system, llama_dir):
    """Cancelled while the prefill worker is computing the prompt and its KV is on the way (layer 0 sent, the
    decode group's reservation live): the reservation is freed at once, the prefill's blocks when its step ends,
    and the late layers land nowhere (the next request's tokens are exact). In-process engines: the test holds a
    prefill step from inside the engine."""
    prompt = [3, 40, 41, 42, 43] * 6
    holds = [_hold_after_layer_0(w, "cancel-mid-prefill#") for w in system.prefill]
    try:
        s = system.client.stream(prompt, request_id="cancel-mid-prefill", max_tokens=200, temperature=0.0,
                                 ignore_eos=True)
        deadline = time.monotonic() + 20
        while not any(h[1].is_set() for h in holds):
            assert time.monotonic() < deadline, "no prefill step reached layer 0"
            time.sleep(0.01)
        worker = next(w for w, h in zip(system.prefill, holds) if h[1].is_set())
        num_blocks = worker.engine.num_blocks
        assert worker.engine.num_free_blocks < num_blocks  # the prompt's blocks, mid-prefill
        d = system.decode.loop.stats
        assert d.remote == 1 and d.free_blocks < d.num_blocks  # reserved, awaiting the KV
        s.cancel()
        with pytest.raises(KvrelayError) as e:
            list(s)
        assert e.value.code == "CANCELLED"
        deadline = time.monotonic() + 10
        while (d := system.decode.loop.stats).free_blocks != d.num_blocks or d.remote:
            assert time.monotonic() < deadline, d
            time.sleep(0.02)
        assert worker.engine.num_free_blocks < num_blocks  # still held: the prefill is still mid-step
    finally:
        for w, (gate, _, original) in zip(system.prefill, holds):
            w.engine.executor.extension.on_layer = original
            gate.set()
    system.wait_free()
    (ref,) = LLM(llama_dir, max_model_len=256).generate([prompt], SamplingParams(max_tokens=16, temperature=0.0,
                                                                                 ignore_eos=True))
    assert system.client.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True).token_ids == \
        ref.token_ids
