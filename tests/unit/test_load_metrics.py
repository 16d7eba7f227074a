"""Metric definitions of `kvrelay bench` on hand-made records: TTFT/TPOT/ITL/E2E, percentiles, throughput,
goodput, hit rate, errors, throughput over time."""

import pytest

from bench.load.config import SLO
from bench.load.metrics import compute_metrics, timeline
from bench.load.records import RequestRecord
from bench.load.stats import percentile, summarize


def rec(index=0, start=0.0, times=(), tokens=None, error=None, prompt=10, cached=0, end=None) -> RequestRecord:
    times = list(times)
    r = RequestRecord(index=index, start_s=start, prompt_len=prompt, output_len=sum(tokens or [1] * len(times)),
                      chunk_times_s=times, chunk_tokens=list(tokens or [1] * len(times)),
                      end_s=end if end is not None else (times[-1] if times else 0.5))
    if error:
        r.error_code, r.error_details = error, "boom"
    else:
        r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens = prompt, cached, r.output_tokens
    return r


def test_percentiles_on_known_data():
    data = list(range(1, 101))  # 1..100
    assert percentile(data, 50) == 50.5
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    s = summarize([0.001, 0.002, 0.003, 0.004], scale=1e3)
    assert (s.count, s.min, s.max) == (4, 1.0, 4.0)
    assert s.mean == pytest.approx(2.5) and s.p50 == pytest.approx(2.5) and s.p90 == pytest.approx(3.7)
    assert summarize([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ttft_tpot_itl_e2e_definitions():
    # chunks at 0.2 s (1 token), 0.3 s (2 tokens at once), 0.6 s (1 token): 4 tokens in 3 chunks
    r = rec(times=[0.2, 0.3, 0.6], tokens=[1, 2, 1], end=0.65)
    assert r.ttft_s == 0.2
    assert r.e2e_s == 0.6  # the last token, not the final message
    assert r.output_tokens == 4
    assert r.tpot_s == pytest.approx((0.6 - 0.2) / 3)
    assert r.itl_s == pytest.approx([0.1, 0.3])  # one gap per chunk: a 2-token chunk arrives at once
    assert sum(r.itl_s) == pytest.approx(r.e2e_s - r.ttft_s)
    one = rec(times=[0.25], tokens=[1])
    assert one.tpot_s is None and one.itl_s == []
    burst = rec(times=[0.25], tokens=[3])  # 3 tokens in one chunk: TPOT 0, no ITL sample
    assert burst.tpot_s == 0.0 and burst.itl_s == []


def test_metrics_of_a_small_run():
    records = [rec(0, 0.0, [0.1, 0.2, 0.3], prompt=10, cached=0),
               rec(1, 0.5, [0.2, 0.4, 0.6], prompt=10, cached=8),
               rec(2, 1.0, [0.3, 0.6, 0.9], prompt=20, cached=4),
               rec(3, 1.5, error="UNAVAILABLE"), rec(4, 1.6, error="RESOURCE_EXHAUSTED"),
               rec(5, 1.7, error="UNAVAILABLE")]
    m = compute_metrics(records, duration_s=2.0)
    assert (m.requested, m.completed, m.failed) == (6, 3, 3)
    assert m.errors == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2}
    assert m.request_throughput == 1.5
    assert m.total_output_tokens == 9 and m.output_throughput == 4.5
    assert m.total_prompt_tokens == 40 and m.total_token_throughput == 24.5
    assert m.cached_prompt_tokens == 12 and m.prefix_cache_hit_rate == pytest.approx(12 / 40)
    assert m.ttft_ms.count == 3 and m.ttft_ms.mean == pytest.approx(200) and m.ttft_ms.p50 == pytest.approx(200)
    assert m.tpot_ms.mean == pytest.approx(200) and m.tpot_ms.min == pytest.approx(100)
    assert m.itl_ms.count == 6 and m.itl_ms.max == pytest.approx(300)  # ITLs pooled over requests
    assert m.e2e_ms.max == pytest.approx(900)
    # No SLO given: every completed request meets it; failed ones never do.
    assert m.good_requests == 3 and m.goodput == m.request_throughput and m.slo_attainment == 0.5


def test_goodput_counts_requests_meeting_every_given_bound():
    records = [rec(0, 0.0, [0.1, 0.15, 0.2]),  # TTFT 100 ms, TPOT 50 ms
               rec(1, 0.0, [0.3, 0.35, 0.4]),  # TTFT 300 ms, TPOT 50 ms
               rec(2, 0.0, [0.1, 0.3, 0.5]),  # TTFT 100 ms, TPOT 200 ms
               rec(3, 0.0, [0.05]),  # one token: TPOT counts as 0
               rec(4, 0.0, error="DEADLINE_EXCEEDED")]
    assert compute_metrics(records, 1.0, SLO(ttft_ms=200)).good_requests == 3
    assert compute_metrics(records, 1.0, SLO(tpot_ms=100)).good_requests == 3
    both = compute_metrics(records, 2.0, SLO(ttft_ms=200, tpot_ms=100))
    assert both.good_requests == 2 and both.goodput == 1.0 and both.slo_attainment == pytest.approx(2 / 5)
    assert both.goodput <= both.request_throughput
    assert compute_metrics(records, 1.0, SLO(ttft_ms=100, tpot_ms=50)).good_requests == 2  # bounds inclusive


def test_failures_never_enter_latency_statistics():
    records = [rec(0, 0.0, [0.1, 0.2]), rec(1, 0.0, [5.0, 9.0], error="INTERNAL")]
    m = compute_metrics(records, 1.0)
    assert m.ttft_ms.count == 1 and m.ttft_ms.max == pytest.approx(100) and m.e2e_ms.max == pytest.approx(200)
    assert compute_metrics([rec(0, error="UNAVAILABLE")], 1.0).ttft_ms is None
    assert compute_metrics([rec(0, error="UNAVAILABLE")], 1.0).prefix_cache_hit_rate is None
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(records, 0.0)


def test_slo_validation():
    with pytest.raises(ValueError, match="--slo-ttft-ms"):
        SLO(ttft_ms=0)
    assert not SLO().given and SLO(tpot_ms=5).given


def test_timeline_bins_tokens_at_arrival_and_requests_at_end():
    records = [rec(0, 0.0, [0.5, 1.5], tokens=[1, 3], end=1.6), rec(1, 1.2, [0.2], tokens=[2], end=0.3),
               rec(2, 2.5, error="UNAVAILABLE", end=0.1)]
    tl = timeline(records, duration_s=3.0, bin_s=1.0)
    assert tl["t_s"] == [0.0, 1.0, 2.0]
    assert tl["output_tokens_per_s"] == [1.0, 5.0, 0.0]
    assert tl["completed_per_s"] == [0.0, 2.0, 0.0] and tl["failed_per_s"] == [0.0, 0.0, 1.0]
    short, mid, long = (timeline(records, duration_s=d) for d in (3.0, 60.0, 600.0))
    assert len(short["t_s"]) == 20 and short["bin_s"] == pytest.approx(0.15)  # short runs: 20 bins
    assert len(mid["t_s"]) == 60 and mid["bin_s"] == pytest.approx(1.0)  # about 1 s each
    assert len(long["t_s"]) == 120 and long["bin_s"] == pytest.approx(5.0)  # long runs: wider bins
    assert sum(short["output_tokens_per_s"]) * short["bin_s"] == pytest.approx(6)  # every token in some bin
