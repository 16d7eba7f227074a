"""Arrival processes of `kvrelay bench`: seeded, right mean rate, burstiness sets the gaps' CV."""

import itertools
import math

import numpy as np
import pytest

from bench.load import seeding
from bench.load.arrivals import arrival_times, inter_arrival_gaps


def gaps(rate: float, burstiness: float, n: int, seed: int = 0) -> np.ndarray:
    return np.array(list(itertools.islice(inter_arrival_gaps(rate, burstiness, seeding.rng(seed, 4)), n)))


def test_same_seed_same_arrivals_and_other_seed_differs():
    a = list(itertools.islice(arrival_times(5.0, 1.0, seeding.rng(7, seeding.ARRIVALS)), 50))
    b = list(itertools.islice(arrival_times(5.0, 1.0, seeding.rng(7, seeding.ARRIVALS)), 50))
    c = list(itertools.islice(arrival_times(5.0, 1.0, seeding.rng(8, seeding.ARRIVALS)), 50))
    assert a == b
    assert a != c
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))


def test_draws_past_one_block_continue_the_sequence():
    g = gaps(3.0, 1.0, 3000)
    assert len(set(g.tolist())) == 3000  # no block repeated


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_mean_rate_whatever_the_burstiness(rate, burstiness):
    g = gaps(rate, burstiness, 40000)
    assert g.min() >= 0
    assert 1.0 / g.mean() == pytest.approx(rate, rel=0.03)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_burstiness_sets_coefficient_of_variation(burstiness):
    g = gaps(2.0, burstiness, 40000)
    cv = g.std() / g.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)  # Poisson (b=1): CV 1


def test_arrival_times_accumulate_gaps():
    times = list(itertools.islice(arrival_times(2.0, 1.0, seeding.rng(0, 4)), 101))
    g = gaps(2.0, 1.0, 100)
    assert np.allclose(np.diff(times), g)
    assert times[-1] == pytest.approx(g.sum())


def test_infinite_rate_sends_everything_at_once():
    assert list(itertools.islice(arrival_times(math.inf, 1.0, seeding.rng(0, 4)), 5)) == [0.0] * 5


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_bad_parameters_say_what_to_fix(rate, burstiness):
    with pytest.raises(ValueError, match="must be > 0"):
        next(inter_arrival_gaps(rate, burstiness, seeding.rng(0, 4)))
