"""The GPU benchmark scripts keep working: their CPU dry-run modes run and write consistent JSON."""

import json
import subprocess
import sys

import pytest


def test_kv_transfer_bench_dry_run(tmp_path):
    out = tmp_path / "kv.json"
    subprocess.run([sys.executable, "-m", "bench.kv_transfer", "--device", "cpu", "--shape", "tiny", "--dtype",
                    "float32", "--tokens", "64", "128", "--reps", "1", "--out", str(out)], check=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["rows"]] == [64, 128]
    for r in res["rows"]:
        assert r["kv_bytes"] == r["tokens"] * 2 * 4 * 2 * 32 * 4  # K+V, 4 layers, 2 KV heads, head_dim 32, fp32
        assert r["raw_ms"] > 0 and r["transfer_ms"] > 0 and r["prefill_ms"] > 0
        assert abs(r["overlap_ratio"] - r["prefill_transfer_ms"] / r["prefill_ms"]) < 1e-9


def test_decode_speed_dry_run(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, "-m", "bench.decode_speed", "--device", "cpu", "--shape", "tiny", "--batch", "1",
                    "3", "--prompt-len", "8", "--gen", "8", "--out", str(out)], check=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 3] and res["copy_bandwidth_GBps"] > 0
    for r in res["rows"]:
        assert r["mode"] == "torch" and list(r["modes_step_ms"]) == ["torch"]  # no Triton or graphs on CPU
        assert r["tok_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert r["hf_step_ms"] > 0 and r["speedup_vs_hf"] == pytest.approx(r["hf_step_ms"] / r["step_ms"])
        # weights: 4 layers of (q, k, v, o, gate, up, down) + norms, final norm, LM head; fp32
        weights = 4 * (128 * (4 + 2 * 2) * 32 + 128 * 128 + 3 * 128 * 256 + 2 * 128) + 128 + 512 * 128
        assert r["weight_bytes"] == 4 * weights
        kv = r["batch"] * (8 + 8 / 2) * (2 * 4 * 2 * 32 * 4)  # average context 12 tokens
        assert r["kv_bytes_per_step"] == kv
        roof_ms = (4 * weights + kv) / (res["copy_bandwidth_GBps"] * 1e9) * 1e3
        assert r["roofline_step_ms"] == pytest.approx(roof_ms)
        assert r["frac_of_roofline"] == pytest.approx(r["roofline_step_ms"] / r["step_ms"])


def test_prefill_speed_dry_run(tmp_path):
    out = tmp_path / "prefill.json"
    subprocess.run([sys.executable, "-m", "bench.prefill_speed", "--device", "cpu", "--shape", "tiny", "--cases",
                    "1x32", "2x16", "--reps", "1", "--out", str(out)], check=True, timeout=300)
    res = json.loads(out.read_text())
    assert [(r["batch"], r["prompt_len"]) for r in res["rows"]] == [(1, 32), (2, 16)]
    layer = 128 * (4 + 2 * 2) * 32 + 128 * 128 + 3 * 128 * 256
    for r in res["rows"]:
        b, n = r["batch"], r["prompt_len"]
        flops = 4 * (2 * layer * b * n + 4 * 4 * 32 * n * (n + 1) // 2 * b) + 2 * 512 * 128 * b
        assert r["flops"] == flops and r["tokens"] == b * n
        assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)
        assert r["roofline_ms"] == pytest.approx(flops / (res["matmul_tflops"] * 1e12) * 1e3)
        assert r["frac_of_roofline"] == pytest.approx(r["roofline_ms"] / r["ms"])
        assert r["hf_ms"] > 0 and r["speedup_vs_hf"] == pytest.approx(r["hf_ms"] / r["ms"])


def test_shared_prefix_scenario_runs_many_requests_at_once(tmp_path):
    """16 requests sharing a 600-token system prompt on a 64-block decode pool: with decode-side prefix sharing
    the group runs at least 8 at once (each private copy would take 38 blocks: 1 at once), every request
    completes with LLM's tokens, and every block comes back."""
    out = tmp_path / "sp.json"
    subprocess.run([sys.executable, "-m", "bench.shared_prefix", "--requests", "16", "--gen", "64", "--check",
                    "--out", str(out)], check=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["peak_running"] >= 8 and r["statuses"] == {"OK": 16} and r["equal_to_llm"] == 16
    assert r["decode_blocks_back"] and r["decode_prefix_hit_rate"] > 0.85


def test_kv_transfer_shared_prefix_workload_dry_run(tmp_path):
    """Multi-turn conversations over one system prompt: with decode-side sharing only the blocks the decode engine
    lacks travel (the script itself fails if the tokens differ between sharing on and off)."""
    out = tmp_path / "kvp.json"
    subprocess.run([sys.executable, "-m", "bench.kv_transfer", "--workload", "shared-prefix", "--device", "cpu",
                    "--shape", "tiny", "--dtype", "float32", "--conversations", "2", "--turns", "3",
                    "--system-len", "128", "--turn-len", "16", "--gen", "8", "--out", str(out)],
                   check=True, timeout=300)
    off, on = json.loads(out.read_text())["rows"]
    assert (off["sharing"], on["sharing"]) == (False, True) and off["requests"] == on["requests"] == 6
    assert off["blocks_reused"] == 0 and on["blocks_reused"] > 0
    # Every block reused is one block less on the wire: tiny shape, 4 layers x K,V x 16 tokens x 2 KV heads x 32
    # dims x 4 bytes.
    assert off["bytes_sent"] - on["bytes_sent"] == on["blocks_reused"] * 4 * 2 * 16 * 2 * 32 * 4
