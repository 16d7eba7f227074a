"""`kvrelay serve` as users run it (what `make serve` runs): a subprocess that starts Ray and the workers, prints
where to connect, serves `kvrelay generate` and the OpenAI HTTP API, and shuts everything down on Ctrl-C
(SIGINT)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_generate_and_ctrl_c(tmp_path):
    pytest.importorskip("ray")
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    # The config file gives most settings; the flags below override or add to it.
    cfg.write_text("prefill-workers: 1\ndecode_groups: 1\ndecode-tp: 2\ndtype: float32\nmax_model_len: 256\n"
                   "prefill_num_blocks: 32\ndecode_num_blocks: 32\nport: 1\n")
    log = open(tmp_path / "serve.log", "w+")
    # --http-port 0: any free port, which the banner names (the flag's wiring, end to end).
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg), "--port", str(port),
                             "--host", "127.0.0.1", "--http-port", "0"], stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "OpenAI-compatible API at" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "kvrelay serve did not come up"
            time.sleep(0.5)
        banner = (tmp_path / "serve.log").read_text()
        assert f"127.0.0.1:{port}" in banner and "decode group(s) of TP 2" in banner
        (ref,) = LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=256).generate(
            ["Return a list of"], SamplingParams(max_tokens=16, temperature=0.0))
        r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--target", f"127.0.0.1:{port}",
                            "--temperature", "0", "--max-tokens", "16", "Return a list of"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == ref.text + "\n", r.stderr
        (base,) = re.findall(r"OpenAI-compatible API at (http://127\.0\.0\.1:\d+)/v1", banner)
        assert not base.endswith(":0")
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        c = httpx.post(f"{base}/v1/completions", json={"prompt": "Return a list of", "max_tokens": 16,
                                                       "temperature": 0}, timeout=60)
        assert c.status_code == 200 and c.json()["choices"][0]["text"] == ref.text, c.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    out = (tmp_path / "serve.log").read_text()
    assert rc == 0 and "kvrelay: stopped" in out, out


def test_serve_rejects_bad_settings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no config.json" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode_tp: 2\nprefil_workers: 3\n")
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown setting(s) ['prefil_workers']" in r.stderr
