"""bench/disagg_vs_agg.py keeps working: its CPU dry run starts both deployments (disaggregated, and aggregated
behind the same router), sweeps each workload, and writes a consistent report."""

import json
import subprocess
import sys

import pytest


def test_disagg_vs_agg_dry_run(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "dva.json"
    r = subprocess.run([sys.executable, "-m", "bench.disagg_vs_agg", "--device", "cpu", "--shape", "tiny", "--quick",
                        "--duration", "0", "--num-requests", "6", "--max-points", "2", "--start-rate", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert {(x["mode"], x["workload"]["name"]) for x in rep["rows"]} == {
        (m, w) for m in ("disaggregated", "aggregated") for w in ("chat", "long")}
    for row in rep["rows"]:
        assert 1 <= len(row["points"]) <= 2
        assert row["best_rate"] is not None and row["goodput"] <= row["request_throughput"] + 1e-9
    assert "vs aggregated" in r.stdout.splitlines()[-5]


def test_serving_overhead_dry_run(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "so.json"
    r = subprocess.run([sys.executable, "-m", "bench.serving_overhead", "--device", "cpu", "--shape", "tiny",
                        "--requests", "12", "--concurrency", "3", "--input-len", "24", "--output-len", "6",
                        "--warmup", "1", "--max-model-len", "256", "--num-blocks", "64", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    (run,) = rep["runs"]
    s, e = run["serving"], run["engine"]
    assert run["concurrency"] == 3 and s["completed"] == 12 and s["total_output_tokens"] == 12 * 6
    assert e["ttft_ms"]["count"] == 12 and e["tpot_ms"]["count"] == 12  # every measured request, once each
    assert s["server_first_token_ms"]["count"] == 12 and s["server_queued_ms"]["count"] == 12
    assert e["output_throughput"] > 0 and run["serving_vs_engine"] == s["output_throughput"] / e["output_throughput"]
    assert run["ttft_p50_over_engine_ms"] == s["ttft_ms"]["p50"] - e["ttft_ms"]["p50"]
    assert "served/alone" in r.stdout
