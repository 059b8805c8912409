"""The run's pace and ETA: steady under one slow slice, honest about its spread."""

from __future__ import annotations

import itertools
import random

import pytest

from kintsugi_daemon.estimate import SlicePace


def test_before_any_slice_the_recipe_estimate_and_its_spread() -> None:
    pace = SlicePace(prior_s=120.0)
    eta, sigma = pace.eta(100)
    assert eta == pytest.approx(12_000) and sigma == pytest.approx(0.3 * 12_000)


def test_one_slow_slice_barely_moves_the_eta() -> None:
    """The jump an operator saw (25.6 -> 35.0 -> 60.4 -> 27.1 min) came from averaging a few periods."""
    pace = SlicePace(prior_s=60.0)
    etas = []
    periods = [60, 61, 59, 60, 62, 240, 60, 61, 59, 60]  # slice 6 had an autofocus sweep and a re-deposit
    for done, period in enumerate(periods, start=1):
        pace.observe(period)
        etas.append(pace.eta(100 - done)[0])
    steps = [abs(b - a) / a for a, b in itertools.pairwise(etas)]
    assert max(steps) < 0.05  # no step of the ETA moves by more than 5 %
    assert etas[-1] == pytest.approx(90 * 60, rel=0.03)


def test_uncertainty_shrinks_as_the_run_goes_on() -> None:
    rng = random.Random(4)
    pace = SlicePace(prior_s=100.0)
    sigmas = []
    for done in range(1, 41):
        pace.observe(rng.gauss(100.0, 5.0))
        eta, sigma = pace.eta(200 - done)
        sigmas.append(sigma / eta)
    assert sigmas[-1] < sigmas[2] and sigmas[-1] < 0.02
    assert pace.eta(0) == (0.0, 0.0)


def test_nonsense_periods_are_ignored() -> None:
    pace = SlicePace(prior_s=10.0)
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        pace.observe(bad)
    assert pace.periods == [] and pace.per_slice_s() == 10.0
