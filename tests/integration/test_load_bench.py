"""`kvrelay bench` against a real deployment (the session's `kvrelay_target`), CI-size: its JSON is complete and
consistent, its token counts are the ones asked for, and shared-prefix traffic hits the prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.load.cli import main

SUMMARY_KEYS = {"count", "mean", "std", "min", "p50", "p90", "p99", "max"}
METRIC_KEYS = {"requested", "completed", "failed", "errors", "duration_s", "request_throughput", "output_throughput",
               "total_token_throughput", "good_requests", "goodput", "slo_attainment", "total_prompt_tokens",
               "total_output_tokens", "cached_prompt_tokens", "prefix_cache_hit_rate", "ttft_ms", "tpot_ms", "itl_ms",
               "e2e_ms"}


def check_summary(s: dict, count: int) -> None:
    assert set(s) == SUMMARY_KEYS and s["count"] == count
    assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["min"] - 1e-9 <= s["mean"] <= s["max"] + 1e-9


def test_bench_cli_json_is_complete_and_consistent(kvrelay_target, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--target", kvrelay_target, "--concurrency", "2", "--num-requests", "6",
         "--input-len", "16", "--input-len-range", "0.5", "--output-len", "8", "--ignore-eos", "--warmup", "1",
         "--seed", "1", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "kvrelay bench" in proc.stdout.splitlines()[0] and "TTFT" in proc.stdout  # the table, last on stdout
    assert "bench [" in proc.stderr  # the progress bar

    doc = json.loads(out.read_text())
    assert doc["schema"] == "kvrelay-bench/1" and doc["model"]["vocab_size"] > 0
    assert doc["config"]["load"]["concurrency"] == 2 and doc["workload"]["kind"] == "random"
    m = doc["metrics"]
    assert set(m) == METRIC_KEYS
    assert m["requested"] == 6 and m["completed"] + m["failed"] == 6 and sum(doc["errors"].values()) == m["failed"]
    assert m["failed"] == 0, doc["errors"]  # a healthy deployment well within its limits
    assert doc["warmup"] == {"requests": 1, "failed": 0}

    reqs = doc["requests"]
    assert [r["index"] for r in reqs] == list(range(6))
    for r in reqs:  # --ignore-eos: exactly the lengths asked for, seen by the client and by the server
        assert r["ok"] and r["output_len"] == 8 and r["output_tokens"] == 8 == r["completion_tokens"]
        assert r["finish_reason"] == "length" and 8 <= r["prompt_len"] <= 24
        assert r["prompt_tokens"] == r["prompt_len"]  # token-id prompts are used as given
        assert sum(r["chunk_tokens"]) == 8
        assert r["ttft_ms"] <= r["e2e_ms"] and sum(r["itl_ms"]) == pytest.approx(r["e2e_ms"] - r["ttft_ms"])
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 7)

    check_summary(m["ttft_ms"], 6)
    check_summary(m["tpot_ms"], 6)
    check_summary(m["e2e_ms"], 6)
    check_summary(m["itl_ms"], sum(len(r["chunk_tokens"]) - 1 for r in reqs))
    assert m["ttft_ms"]["max"] <= m["e2e_ms"]["max"]
    assert m["total_output_tokens"] == 48 and m["total_prompt_tokens"] == sum(r["prompt_len"] for r in reqs)
    assert m["request_throughput"] * m["duration_s"] == pytest.approx(6)
    assert m["output_throughput"] * m["duration_s"] == pytest.approx(48)
    assert m["total_token_throughput"] * m["duration_s"] == pytest.approx(48 + m["total_prompt_tokens"])
    assert m["goodput"] <= m["request_throughput"] + 1e-9
    assert m["good_requests"] == 6 and m["slo_attainment"] == 1.0  # SLOs of a minute: all met
    assert 0.0 <= m["prefix_cache_hit_rate"] <= 1.0
    tl = doc["timeline"]
    assert sum(tl["output_tokens_per_s"]) * tl["bin_s"] == pytest.approx(48)


def test_shared_prefix_traffic_hits_the_prefix_cache(kvrelay_target, tmp_path, capsys):
    out = tmp_path / "prefix.json"
    # Two system prompts of 3 KV blocks (block size 16), warmed up, then 3 questions each, one at a time.
    rc = main(["--target", kvrelay_target, "--concurrency", "1", "--num-prefixes", "2", "--questions-per-prefix", "3",
               "--prefix-len", "48", "--input-len", "8", "--output-len", "4", "--ignore-eos", "--warmup", "2",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert "Prefix cache hit rate" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    m, reqs = doc["metrics"], doc["requests"]
    assert m["completed"] == m["requested"] == 6
    assert sorted(r["group"] for r in reqs) == [0, 0, 0, 1, 1, 1]
    assert all(r["cached_prompt_tokens"] >= 16 for r in reqs)  # each reused at least its prefix's first block
    assert m["cached_prompt_tokens"] == sum(r["cached_prompt_tokens"] for r in reqs)
    assert m["prefix_cache_hit_rate"] == pytest.approx(m["cached_prompt_tokens"] / m["total_prompt_tokens"])
    assert m["prefix_cache_hit_rate"] > 0.25


def test_sweep_reports_every_point(kvrelay_target, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = main(["--target", kvrelay_target, "--sweep", "--rate", "2", "--sweep-max-points", "2", "--num-requests", "3",
               "--input-len", "8", "--output-len", "4", "--ignore-eos", "--slo-ttft-ms", "60000", "--out", str(out),
               "--quiet"])
    assert rc == 0
    assert "Highest rate meeting the target" in capsys.readouterr().out
    sweep = json.loads(out.read_text())["sweep"]
    assert [p["rate"] for p in sweep["points"]] == [2.0, 4.0]  # met at 2 (a minute's TTFT), so doubled
    assert sweep["best_rate"] == 4.0 and sweep["lowest_missed_rate"] is None
    for p in sweep["points"]:
        assert p["metrics"]["completed"] + p["metrics"]["failed"] == 3
        assert p["metrics"]["goodput"] <= p["metrics"]["request_throughput"] + 1e-9


def test_processes_split_a_closed_loop_into_the_single_process_requests(kvrelay_target, tmp_path, capsys):
    # Lengths vary per request (index -> lengths is a function of the seed), so equal records mean equal requests.
    flags = ["--target", kvrelay_target, "--concurrency", "3", "--num-requests", "8", "--input-len", "8",
             "--input-len-range", "0.5", "--output-len", "6", "--output-len-range", "0.5", "--ignore-eos",
             "--warmup", "2", "--seed", "3"]
    docs = {}
    for n in (1, 2):
        out = tmp_path / f"processes-{n}.json"
        assert main([*flags, "--processes", str(n), "--out", str(out), *(["--quiet"] if n == 1 else [])]) == 0
        docs[n] = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert "starting 2 load processes" in captured.err and "bench [" in captured.err  # the parent's bar
    assert "2 client processes" in captured.out  # the table's load line

    one, two = docs[1], docs[2]
    assert two["config"]["load"]["processes"] == 2 and set(two["metrics"]) == METRIC_KEYS
    m, reqs = two["metrics"], two["requests"]
    assert m["requested"] == m["completed"] == 8 and m["failed"] == 0, two["errors"]
    assert two["warmup"] == {"requests": 2, "failed": 0}

    def key(r: dict) -> tuple:
        return r["index"], r["prompt_len"], r["output_len"]

    assert [r["index"] for r in reqs] == list(range(8))  # each request sent once, by one worker
    assert [key(r) for r in reqs] == [key(r) for r in one["requests"]]  # ... and the single process's requests
    assert len({r["request_id"] for r in reqs}) == 8 and len({r["output_len"] for r in reqs}) > 1
    for r in reqs:  # --ignore-eos: exactly the lengths asked for
        assert r["ok"] and r["output_tokens"] == r["output_len"] == r["completion_tokens"]
        assert r["prompt_tokens"] == r["prompt_len"] and r["finish_reason"] == "length"
    assert m["total_output_tokens"] == sum(r["output_len"] for r in reqs)
    assert m["request_throughput"] * m["duration_s"] == pytest.approx(8)
    # One run's clock: every record from the common start, the duration to the last worker's last response.
    assert min(r["start_s"] for r in reqs) >= 0
    assert max(r["start_s"] + r["end_s"] for r in reqs) <= m["duration_s"] + 1e-6
    check_summary(m["tpot_ms"], 8)
    check_summary(m["itl_ms"], sum(len(r["chunk_tokens"]) - 1 for r in reqs))
