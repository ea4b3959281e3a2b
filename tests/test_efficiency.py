"""Per-job efficiency: joules per token, request and sample, gCO2eq per 1,000 tokens, from JobTotals."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.api.models import job_out
from agent.model import JobEfficiency, JobRef, JobTotals, JobView, efficiency


def test_serving_job_divides_by_generated_tokens_not_prompt_tokens():
    totals = JobTotals(
        energy_j={"cpu": 300.0, "dram": 20.0, "gpu": 1680.0},
        work_units={"tokens_prompt": 40_000.0, "tokens_generated": 8_000.0, "requests": 50.0},
        emissions_g=0.4,
    )
    assert efficiency(totals) == JobEfficiency(
        energy_per_token_j=2000.0 / 8000.0,
        energy_per_request_j=2000.0 / 50.0,
        energy_per_sample_j=None,
        emissions_per_1k_tokens_g=0.4 / 8000.0 * 1000.0,
        token_unit="tokens_generated",
    )


def test_training_job_uses_its_tokens_and_samples():
    totals = JobTotals(energy_j={"cpu": 90.0, "gpu": 30.0}, work_units={"tokens": 6000.0, "samples": 24.0})
    figures = totals.efficiency
    assert figures.token_unit == "tokens"
    assert figures.energy_per_token_j == pytest.approx(0.02) and figures.energy_per_sample_j == pytest.approx(5.0)
    assert figures.energy_per_request_j is None and figures.emissions_per_1k_tokens_g == 0.0


def test_no_work_gives_no_figure_rather_than_infinity():
    assert efficiency(JobTotals(energy_j={"cpu": 5.0})) == JobEfficiency()
    # A zero count of generated tokens falls back to the plain tokens, and then to nothing.
    assert efficiency(JobTotals(energy_j={"cpu": 5.0}, work_units={"tokens_generated": 0.0})) == JobEfficiency()


@given(
    energy=st.dictionaries(st.sampled_from(["cpu", "dram", "gpu"]), st.floats(0, 1e12)),
    work=st.dictionaries(
        st.sampled_from(["tokens", "tokens_generated", "tokens_prompt", "requests", "samples"]), st.floats(0, 1e15)
    ),
    grams=st.floats(0, 1e9),
)
def test_figures_are_finite_non_negative_and_multiply_back(energy, work, grams):
    totals = JobTotals(energy_j=energy, work_units=work, emissions_g=grams)
    figures = efficiency(totals)
    for value in (
        figures.energy_per_token_j,
        figures.energy_per_request_j,
        figures.energy_per_sample_j,
        figures.emissions_per_1k_tokens_g,
    ):
        assert value is None or (math.isfinite(value) and value >= 0)
    if figures.energy_per_sample_j is not None:
        assert figures.energy_per_sample_j * work["samples"] == pytest.approx(totals.total_energy_j, rel=1e-9)
    assert (figures.energy_per_token_j is None) == (figures.token_unit is None)


def test_the_job_body_carries_the_figures():
    totals = JobTotals(energy_j={"gpu": 500.0}, work_units={"samples": 100.0}, emissions_g=1.0)
    body = job_out(JobView(JobRef("r-1", "ft", "registered"), {}, {}, 1, None, totals)).model_dump(mode="json")
    assert body["efficiency"] == {
        "energy_per_token_j": None,
        "energy_per_request_j": None,
        "energy_per_sample_j": 5.0,
        "emissions_per_1k_tokens_g": None,
        "token_unit": None,
    }
    assert body["work_units"] == {"samples": 100.0}
