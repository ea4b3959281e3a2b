"""The attribution arithmetic: conservation, shares, idle estimation."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.attribution.cpu import IdlePowerEstimator, conservation_error_j, split_domain

energies = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
odd_floats = st.one_of(
    energies, st.just(float("nan")), st.just(float("inf")), st.just(-1.0), st.floats(min_value=-1e6, max_value=0)
)
cpu_maps = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(st.floats(min_value=0, max_value=64, allow_nan=False), st.just(float("nan")), st.just(-3.0)),
    max_size=30,
)


@given(
    measured=energies, idle_w=odd_floats, interval=st.floats(min_value=0, max_value=60), jobs=cpu_maps, busy=odd_floats
)
@settings(max_examples=500, deadline=None)
def test_parts_always_sum_to_measured_and_are_never_negative(measured, idle_w, interval, jobs, busy):
    part = split_domain("cpu", measured, idle_w, interval, jobs, busy)
    assert conservation_error_j(part) <= 1e-9 * max(measured, 1.0)
    values = [part.idle_j, part.unattributed_j, *part.jobs_j.values()]
    assert all(math.isfinite(v) and v >= 0 for v in values)


@given(
    measured=st.floats(min_value=0, max_value=1e4),
    idle_w=st.floats(min_value=0, max_value=500),
    jobs=st.dictionaries(st.sampled_from("abcdef"), st.floats(min_value=0.001, max_value=4), min_size=2),
    host=st.floats(min_value=0, max_value=4),
)
@settings(max_examples=300, deadline=None)
def test_jobs_share_active_energy_in_proportion_to_cpu_time(measured, idle_w, jobs, host):
    busy = sum(jobs.values()) + host
    part = split_domain("cpu", measured, idle_w, 1.0, jobs, busy)
    active = measured - part.idle_j
    for job, seconds in jobs.items():
        assert part.jobs_j.get(job, 0.0) == pytest.approx(active * seconds / busy, rel=1e-9, abs=1e-12)


def test_three_to_one_cpu_gives_three_to_one_energy():
    part = split_domain("cpu", 100.0, 20.0, 1.0, {"a": 0.75, "b": 0.25}, 1.5)
    assert part.idle_j == 20.0
    assert part.jobs_j["a"] / part.jobs_j["b"] == pytest.approx(3.0)
    assert part.unattributed_j == pytest.approx(80.0 * 0.5 / 1.5)


def test_idle_does_not_shrink_as_load_rises():
    # The "energy x usage ratio" method would give 100 * (1 - 0.95) = 5 J idle here.
    part = split_domain("cpu", 100.0, 40.0, 1.0, {"a": 1.9}, 1.9)
    assert part.idle_j == 40.0


def test_idle_estimator_recovers_the_intercept_of_a_noisy_linear_device():
    rng = random.Random(7)
    estimator = IdlePowerEstimator()
    for _ in range(2000):
        u = rng.random()
        estimator.observe(u, 35.0 + 120.0 * u + rng.gauss(0, 3.0))
    assert estimator.estimate_w() == pytest.approx(35.0, abs=2.0)


def test_idle_estimator_at_a_single_operating_point_uses_the_model_prior():
    estimator = IdlePowerEstimator(prior_idle_fraction=0.12)
    for _ in range(50):
        estimator.observe(1.0, 200.0)
    # P(1) = max -> idle = 0.12 * 200, not 200 (everything idle) nor 0.
    assert estimator.estimate_w() == pytest.approx(24.0)
    idle_only = IdlePowerEstimator()
    for _ in range(50):
        idle_only.observe(0.0, 42.0)
    assert idle_only.estimate_w() == pytest.approx(42.0)


def test_idle_estimate_never_exceeds_lowest_observed_power():
    estimator = IdlePowerEstimator()
    for _ in range(30):
        estimator.observe(0.2, 50.0)
        estimator.observe(0.9, 40.0)  # a device that draws less when busier: nonsense fit
    assert 0.0 <= estimator.estimate_w() <= 40.0
