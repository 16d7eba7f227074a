"""The rate sweep's search, against synthetic monotone systems."""

import pytest

from bench.load.config import SweepConfig
from bench.load.rate_search import RateSearch


def search(capacity: float, **cfg) -> RateSearch:
    """Run the search on a system that meets the target at every rate <= capacity and misses above it."""
    s = RateSearch(SweepConfig(**cfg))
    while (rate := s.next_rate()) is not None:
        s.record(rate, rate <= capacity)
    return s


@pytest.mark.parametrize("capacity", [0.3, 1.0, 7.3, 50.0, 123.4])
def test_finds_the_capacity_within_tolerance(capacity):
    s = search(capacity, tolerance=0.05, max_points=30)
    assert s.best is not None and s.best <= capacity
    assert s.worst is not None and s.worst > capacity
    assert (s.worst - s.best) / s.best <= 0.05
    assert all(p.met == (p.rate <= capacity) for p in s.probes)  # every point measured is kept


def test_exponential_then_bisection_path():
    s = search(7.3, start_rate=1.0, tolerance=0.1)
    assert [p.rate for p in s.probes] == [1.0, 2.0, 4.0, 8.0, 6.0, 7.0, 7.5]
    assert s.best == 7.0 and s.worst == 7.5


def test_going_down_when_the_start_rate_misses():
    s = search(0.7, start_rate=4.0, tolerance=0.1)
    assert [p.rate for p in s.probes][:4] == [4.0, 2.0, 1.0, 0.5]
    assert s.best is not None and 0.63 < s.best <= 0.7


def test_no_rate_meets():
    s = search(0.0, start_rate=1.0, min_rate=0.1)
    assert s.best is None and [p.rate for p in s.probes] == [1.0, 0.5, 0.25, 0.125]


def test_capped_at_max_rate_and_max_points():
    s = search(1e9, start_rate=1.0, max_rate=10.0)
    assert [p.rate for p in s.probes] == [1.0, 2.0, 4.0, 8.0, 10.0] and s.best == 10.0 and s.capped
    s = search(7.3, tolerance=0.001, max_points=5)
    assert len(s.probes) == 5 and s.best == 6.0 and not s.capped


def test_attainment_threshold_on_a_graded_system():
    """Attainment falls smoothly with the rate; the answer is the highest rate with attainment >= target."""
    def attainment(rate: float) -> float:
        return max(0.0, min(1.0, 1.5 - rate / 10))  # 1 up to 5 req/s, 0.9 at 6, 0 at 15

    s = RateSearch(SweepConfig(attainment=0.9, tolerance=0.02, max_points=40))
    while (rate := s.next_rate()) is not None:
        s.record(rate, attainment(rate) >= 0.9)
    assert 6.0 * 0.98 <= s.best <= 6.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(attainment=0), "--attainment"), (dict(attainment=1.5), "--attainment"),
    (dict(start_rate=0.001), "sweep rates"), (dict(tolerance=0), "--sweep-tolerance"),
    (dict(max_points=1), "--sweep-max-points")])
def test_sweep_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)
