"""The GPU benchmark scripts keep working: their CPU dry-run modes run and write consistent JSON."""

import json
import subprocess
import sys


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
