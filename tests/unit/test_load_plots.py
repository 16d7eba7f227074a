"""`--plot` writes PNGs from a results document (skipped where matplotlib is not installed)."""

import pytest

from bench.load.config import BenchConfig, LoadConfig, WorkloadConfig
from bench.load.metrics import compute_metrics
from bench.load.records import RequestRecord
from bench.load.report import result_json, run_json
from bench.load.runner import RunResult


def doc() -> dict:
    records = []
    for i in range(30):
        r = RequestRecord(index=i, start_s=0.1 * i, prompt_len=8, output_len=4, chunk_times_s=[0.05, 0.07, 0.1],
                          chunk_tokens=[1, 2, 1], end_s=0.11, prompt_tokens=8, completion_tokens=4,
                          cached_prompt_tokens=0)
        if i % 10 == 9:
            r.error_code = "UNAVAILABLE"
        records.append(r)
    run = RunResult(records, 3.2, [])
    cfg = BenchConfig(target="h:1", workload=WorkloadConfig(), load=LoadConfig(rate=10, num_requests=30))
    return result_json(cfg, {"model": "m"}, {"kind": "random"}, run_json(compute_metrics(records, 3.2), run))


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.load.plots import write_plots

    paths = write_plots(doc(), str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["latency_cdf.png", "throughput.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from bench.load.plots import write_plots

    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        write_plots(doc(), str(tmp_path))
