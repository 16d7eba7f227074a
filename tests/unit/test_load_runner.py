"""The load runner, the sweep driver and the whole `kvrelay bench` flow against an in-process fake client (no
network): load shapes, warm-up exclusion, errors by code, the results document."""

import asyncio
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from bench.load.command import run_bench
from bench.load.config import SLO, BenchConfig, LoadConfig, SamplingConfig, SweepConfig, WorkloadConfig
from bench.load.lengths import LengthDist
from bench.load.measure import error_code
from bench.load.report import write_json
from bench.load.runner import RunOptions, run_load
from bench.load.workloads import ModelLimits, RandomWorkload

LIMITS = ModelLimits(vocab_size=500, max_model_len=256)


class Refused(Exception):
    code = "RESOURCE_EXHAUSTED"


@dataclass
class FakeModelInfo:
    model: str = "fake"
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 500
    max_model_len: int = 256
    has_tokenizer: bool = True
    prefill_workers: int = 1
    decode_groups: int = 1
    decode_tensor_parallel_size: int = 1


class FakeClient:
    """Streams `max_tokens` tokens, `chunk` per message, after a short delay; refuses prompts starting with an id
    divisible by `refuse_mod`; keeps count of calls and of requests in flight."""

    def __init__(self, chunk: int = 1, refuse_mod: int = 0, delay_s: float = 0.002) -> None:
        self.chunk, self.refuse_mod, self.delay_s = chunk, refuse_mod, delay_s
        self.calls: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def model_info(self, timeout=None):
        return FakeModelInfo()

    def stream(self, prompt, *, timeout=None, **sampling):
        self.calls.append(dict(prompt=prompt, timeout=timeout, **sampling))
        if sampling["max_tokens"] > 100:  # as the SDK does for a parameter it rejects before sending
            raise ValueError("max_tokens too large")
        return FakeStream(self, prompt, sampling)


class FakeStream:
    def __init__(self, client: FakeClient, prompt, sampling) -> None:
        self.c, self.prompt, self.sampling, self.final = client, prompt, sampling, None

    async def __aiter__(self):
        c = self.c
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)
        try:
            await asyncio.sleep(c.delay_s)
            if c.refuse_mod and self.prompt[0] % c.refuse_mod == 0:
                raise Refused("admission queue full")
            n = self.sampling["max_tokens"]
            for k in range(0, n, c.chunk):
                yield SimpleNamespace(token_ids=[7] * min(c.chunk, n - k), text="x")
                await asyncio.sleep(c.delay_s / 4)
            usage = SimpleNamespace(prompt_tokens=len(self.prompt), completion_tokens=n, cached_prompt_tokens=2)
            timings = SimpleNamespace(queued_ms=0.1, first_token_ms=2.0, kv_landed_ms=1.5, total_ms=3.0)
            self.final = SimpleNamespace(request_id="r", finish_reason="length", usage=usage, timings=timings)
        finally:
            c.in_flight -= 1

    async def cancel(self) -> None:
        pass


def workload(seed: int = 0) -> RandomWorkload:
    return RandomWorkload(LengthDist(16, range_ratio=0.5), LengthDist(6), LIMITS, seed=seed)


def run(client, load: LoadConfig, **opts):
    sampling = SamplingConfig(ignore_eos=True)
    return asyncio.run(run_load(client, workload(), load, sampling, RunOptions(progress=False, **opts)))


def test_closed_loop_keeps_concurrency_and_excludes_warmup():
    c = FakeClient()
    res = run(c, LoadConfig(concurrency=3, num_requests=12, warmup=4))
    assert len(c.calls) == 16 and len(res.warmup) == 4
    assert [r.index for r in res.records] == list(range(12))
    assert c.max_in_flight == 3
    assert all(r.ok and r.output_tokens == 6 and r.completion_tokens == 6 for r in res.records)
    assert all(call["ignore_eos"] and call["max_tokens"] == 6 for call in c.calls)
    measured = [call["prompt"] for call in c.calls[4:]]
    assert sorted(map(tuple, measured)) == sorted(tuple(workload().request(i).prompt) for i in range(12))


def test_open_loop_sends_at_the_rate_with_an_optional_cap():
    c = FakeClient()
    res = run(c, LoadConfig(rate=400.0, num_requests=40))
    starts = [r.start_s for r in res.records]
    assert starts == sorted(starts) and len(starts) == 40
    assert 0.04 < starts[-1] < 0.5  # 39 gaps of 2.5 ms on average
    capped = FakeClient()
    run(capped, LoadConfig(rate=float("inf"), concurrency=2, num_requests=10))
    assert capped.max_in_flight == 2


def test_duration_limits_sending_and_every_request_is_accounted_for():
    c = FakeClient()
    res = run(c, LoadConfig(concurrency=2, duration=0.15))
    assert len(res.records) == len(c.calls) >= 2
    assert all(r.start_s < 0.15 for r in res.records)
    res = run(FakeClient(), LoadConfig(rate=100.0, duration=0.2, num_requests=5))
    assert len(res.records) == 5  # whichever limit comes first


def test_errors_are_recorded_by_code_and_chunks_of_several_tokens_count_fully():
    c = FakeClient(chunk=4, refuse_mod=3)
    res = run(c, LoadConfig(concurrency=4, num_requests=30))
    refused = {i for i in range(30) if workload().request(i).prompt[0] % 3 == 0}
    assert refused and {r.index for r in res.records if not r.ok} == refused
    assert all(r.error_code == "RESOURCE_EXHAUSTED" for r in res.records if not r.ok)
    ok = [r for r in res.records if r.ok]
    assert all(r.output_tokens == 6 and r.chunk_tokens == [4, 2] for r in ok)


def test_a_request_the_sdk_rejects_before_sending_is_a_counted_failure():
    w = RandomWorkload(LengthDist(8), LengthDist(101), LIMITS, seed=0)
    res = asyncio.run(run_load(FakeClient(), w, LoadConfig(concurrency=1, num_requests=2), SamplingConfig(),
                               RunOptions(progress=False)))
    assert [(r.ok, r.error_code) for r in res.records] == [(False, "CLIENT_ValueError")] * 2


def test_error_code_of_sdk_and_other_exceptions():
    from client import KvrelayError

    assert error_code(KvrelayError("UNAVAILABLE", "no worker")) == "UNAVAILABLE"
    assert error_code(ConnectionResetError()) == "CLIENT_ConnectionResetError"


def bench_config(tmp_path, **kw) -> BenchConfig:
    base = dict(target="fake:1", workload=WorkloadConfig(input_len=LengthDist(16), output_len=LengthDist(5)),
                load=LoadConfig(concurrency=2, num_requests=6, warmup=1), sampling=SamplingConfig(ignore_eos=True),
                slo=SLO(ttft_ms=10_000), out=str(tmp_path / "r.json"), quiet=True)
    base.update(kw)
    return BenchConfig(**base)


def test_run_bench_writes_a_complete_results_document(tmp_path):
    cfg = bench_config(tmp_path)
    out = asyncio.run(run_bench(cfg, FakeClient(refuse_mod=4)))
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc == json.loads(json.dumps(out.doc))
    m = doc["metrics"]
    assert m["completed"] + m["failed"] == m["requested"] == 6 == len(doc["requests"])
    assert sum(doc["errors"].values()) == m["failed"] and set(doc["errors"]) <= {"RESOURCE_EXHAUSTED"}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = m[key]
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"] and s["min"] <= s["mean"] <= s["max"]
    assert m["goodput"] <= m["request_throughput"]
    assert m["prefix_cache_hit_rate"] == pytest.approx(2 / 16)
    assert doc["config"]["load"]["concurrency"] == 2 and doc["model"]["model"] == "fake"
    assert doc["warmup"] == {"requests": 1, "failed": doc["warmup"]["failed"]}
    assert "Errors by code" in out.table and "TTFT" in out.table


def test_run_bench_sweep_measures_fresh_requests_per_point(tmp_path):
    cfg = bench_config(tmp_path, load=LoadConfig(rate=50.0, num_requests=5, warmup=2),
                       sweep=SweepConfig(start_rate=50.0, max_rate=200.0))
    client = FakeClient()
    out = asyncio.run(run_bench(cfg, client))
    sweep = out.doc["sweep"]
    assert [p["rate"] for p in sweep["points"]] == [50.0, 100.0, 200.0]
    assert sweep["best_rate"] == 200.0 and sweep["capped"] and sweep["lowest_missed_rate"] is None
    assert [[r["index"] for r in p["requests"]] for p in sweep["points"]] == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert [p["warmup"]["requests"] for p in sweep["points"]] == [2, 0, 0] and len(client.calls) == 17
    assert "Highest rate meeting the target: 200 req/s or more" in out.table


def test_json_has_no_invalid_numbers(tmp_path):
    path = tmp_path / "x.json"
    write_json(str(path), {"rate": float("inf"), "nested": [float("nan")]})
    assert json.loads(path.read_text()) == {"rate": "inf", "nested": ["nan"]}
