"""The engine core process (worker_runtime.engine_core; in one process, no Ray): a worker's engine runs in a child
process of its own, whose tokens equal `LLM`'s; engine errors come back typed; SIGKILLing a decode group's core
ends its streams with UNAVAILABLE within 2 s, its GetLoad says why, and health turns NOT_SERVING; and a core
never outlives its parent."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from local_system import SECRET, start_local

from client import KvrelayError
from engine import LLM, EngineConfig, SamplingParams
from engine.engine_loop import EngineDead, EngineLoop
from router.worker_api import DecodeClient
from worker_runtime.engine_core import EngineCoreClient

GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
KILLED = "engine core process exited with signal 9 (SIGKILL)"


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_system_of_core_processes_gives_llms_tokens(llama_dir):
    system = start_local(llama_dir, num_prefill=1)
    try:
        for w in (system.decode, system.prefill[0]):  # on by default: each engine in a process of its own
            assert isinstance(w.loop, EngineCoreClient) and w.engine is None
            assert w.loop.process.pid != os.getpid() and w.loop.process.poll() is None
        prompts = [[3 + i, 40, 41, 42, 43] * 3 for i in range(4)]
        refs = LLM(llama_dir, max_model_len=256).generate(prompts, SamplingParams(**GREEDY))
        got = [system.client.generate(p, **GREEDY).token_ids for p in prompts]
        assert got == [r.token_ids for r in refs]
        system.wait_free()
        assert system.decode.loop.stats.steps >= 11 and system.decode.loop.stuck_for() < 1.0  # per its heartbeats
    finally:
        system.stop()
    assert system.decode.loop.process.returncode == 0  # stopped cleanly, not killed


def test_operations_cross_the_process_boundary_typed(llama_dir):
    core = EngineCoreClient("t", EngineConfig.from_model_dir(llama_dir, num_blocks=32, max_model_len=128))
    try:
        assert core.config.cache.num_blocks == 32 and core.stats.free_blocks == 32
        with pytest.raises(KeyError, match="no remote prefill pending for request 'nope'"):
            core.call("set_first_token", "nope", 5).result(10)
        with pytest.raises(ValueError, match="the prompt is empty"):
            core.call("add_request", "r", [], SamplingParams()).result(10)
        with pytest.raises(ValueError, match="not an engine operation"):
            core.call("step")
        outs, done = [], threading.Event()

        def sink(out):
            outs.append(out)
            done.set() if out.finished else None

        asyncio.run(core.astart("r", sink, "add_request", "r", [1, 2, 3, 4], SamplingParams(**GREEDY)))
        assert done.wait(20)
        (ref,) = LLM(llama_dir, max_model_len=128).generate([[1, 2, 3, 4]], SamplingParams(**GREEDY))
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids == ref.token_ids
    finally:
        core.stop()
    with pytest.raises(EngineDead, match="engine stopped"):
        core.call("abort_request", "r").result(1)


def test_a_killed_decode_core_ends_its_streams_at_once(llama_dir):
    system = start_local(llama_dir, num_prefill=1)
    try:
        assert health(system.target) == health_pb2.HealthCheckResponse.SERVING
        ended: dict[int, tuple[str, float]] = {}
        started = threading.Barrier(5)

        def one(i: int) -> None:
            it = iter(system.client.stream([5 + i, 6, 7, 8], max_tokens=240, temperature=0.0, ignore_eos=True))
            next(it)
            started.wait(30)
            try:
                list(it)
                ended[i] = ("OK", time.monotonic())
            except KvrelayError as e:
                ended[i] = (e.code, time.monotonic(), e.details)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(30)  # every stream has its first token (the prefill's)
        deadline = time.monotonic() + 10
        while system.decode.loop.stats.running != 4:  # and is decoding on the group
            assert time.monotonic() < deadline, system.decode.loop.stats
            time.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(system.decode.loop.process.pid, signal.SIGKILL)
        for t in threads:
            t.join(10)
        took = [ended[i][1] - killed_at for i in range(4)]
        print(f"streams ended {max(took):.3f} s after the SIGKILL")
        assert [ended[i][0] for i in range(4)] == ["UNAVAILABLE"] * 4 and max(took) < 2.0, (ended, took)
        assert all(KILLED in ended[i][2] and "\n" not in ended[i][2] for i in range(4)), ended
        assert system.decode.loop.error == KILLED
        load = asyncio.run(_load(system.decode.address))
        assert not load.healthy and load.error == KILLED
        deadline = time.monotonic() + 5  # the router's next load poll sees it: its only decode group is gone
        while health(system.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(KvrelayError) as e:
            system.client.generate([5, 6, 7, 8], **GREEDY)
        assert e.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 2
        assert "no healthy decode group" in e.value.details and KILLED in e.value.details, e.value.details
        with pytest.raises(EngineDead, match=re.escape(KILLED)):
            system.decode.loop.call("abort_request", "x").result(1)
    finally:
        system.stop()


async def _load(address: str):
    client = DecodeClient(address, SECRET, "d0")
    try:
        return await client.load(5)
    finally:
        await client.close()


PARENT = textwrap.dedent("""
    import sys, time
    from engine import EngineConfig
    from worker_runtime.engine_core import EngineCoreClient
    core = EngineCoreClient("orphan", EngineConfig.from_model_dir(sys.argv[1], num_blocks=16, max_model_len=64))
    print(core.process.pid, flush=True)
    time.sleep(120)
""")


def test_a_core_dies_with_its_parent(llama_dir):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, llama_dir], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        t0 = time.monotonic()
        while _alive(child):
            assert time.monotonic() - t0 < 2, "the engine core outlived its parent"
            time.sleep(0.01)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_switch_keeps_the_engine_in_process(llama_dir, monkeypatch):
    from decode_workers.group import DecodeLeader

    monkeypatch.setenv("KVRELAY_ENGINE_PROCESS", "0")
    d = DecodeLeader("d0", EngineConfig.from_model_dir(llama_dir, num_blocks=16, max_model_len=64), secret=SECRET)
    try:
        assert isinstance(d.loop, EngineLoop) and d.engine is d.loop.engine
    finally:
        d.stop()
