"""`kvrelay bench` flags -> configs, and the errors that say what to fix."""

import math

import pytest

from bench.load.cli import build_parser, config_from_args, main
from bench.load.lengths import LengthDist


def cfg(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_open_loop_random_workload():
    c = cfg("--target", "h:1", "--rate", "4", "--burstiness", "0.5", "--num-requests", "20", "--input-len", "128",
            "--input-len-range", "0.25", "--output-len", "32", "--output-len-std", "4", "--ignore-eos", "--seed", "9",
            "--slo-ttft-ms", "200", "--slo-tpot-ms", "20", "--warmup", "3", "--out", "r.json", "--plot", "p")
    assert c.target == "h:1" and c.workload.kind == "random" and c.workload.seed == 9
    assert c.workload.input_len == LengthDist(128, range_ratio=0.25)
    assert c.workload.output_len == LengthDist(32, std=4)
    assert (c.load.rate, c.load.burstiness, c.load.concurrency, c.load.num_requests, c.load.warmup) == (
        4.0, 0.5, None, 20, 3)
    assert c.sampling.ignore_eos and (c.slo.ttft_ms, c.slo.tpot_ms) == (200, 20)
    assert (c.out, c.plot_dir, c.sweep) == ("r.json", "p", None)


def test_closed_loop_shared_prefix_defaults_and_sharegpt():
    c = cfg("--concurrency", "8", "--num-prefixes", "4")
    assert c.workload.kind == "shared-prefix" and not c.load.open_loop
    assert (c.workload.questions_per_prefix, c.workload.prefix_len) == (8, 256)
    assert c.load.num_requests == 32  # one pass: N x M
    assert c.workload.output_len is None  # resolved to 128 when the workload is built
    d = cfg("--rate", "inf", "--num-requests", "5", "--dataset", "s.json", "--tokenizer", "tok.json")
    assert d.workload.kind == "sharegpt" and math.isinf(d.load.rate)
    assert cfg("--concurrency", "1", "--duration", "30").load.num_requests is None


def test_sweep_starts_at_rate():
    c = cfg("--sweep", "--slo-ttft-ms", "100", "--attainment", "0.95", "--num-requests", "50")
    assert c.sweep.start_rate == 1.0 and c.sweep.attainment == 0.95 and c.load.rate == 1.0
    assert cfg("--sweep", "--rate", "8", "--slo-tpot-ms", "30").sweep.start_rate == 8.0


@pytest.mark.parametrize("argv,message", [
    ([], "choose a load"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--rate", "inf", "--duration", "5"], "needs --num-requests"),
    (["--rate", "1", "--input-len-range", "0.5", "--input-len-std", "3"], "not both"),
    (["--rate", "1", "--prefix-len", "64"], "only apply to the shared-prefix"),
    (["--rate", "1", "--dataset", "s.json"], "--tokenizer"),
    (["--sweep"], "give --slo-ttft-ms"),
    (["--rate", "1", "--target", "nohost"], "host:port"),
])
def test_bad_flags_exit_2_with_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
