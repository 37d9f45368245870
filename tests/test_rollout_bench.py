"""bench/rollout_bench.py's offline scenarios, reduced (Ray-free): simulated traffic, the real controller."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import rollout_bench as rb  # noqa: E402

from cotrr_ray.experiments.rollout import load_plan  # noqa: E402


@pytest.fixture(scope="module")
def sim_plan():
    return load_plan(rb.SIM_PLAN)


@pytest.mark.parametrize("scenario", [rb.scenario_broken, rb.scenario_better, rb.scenario_kill, rb.scenario_srm])
def test_offline_scenario_passes(tmp_path, sim_plan, scenario) -> None:
    rep = scenario(tmp_path, sim_plan)
    assert rep.ok, rep.checks
    assert rep.measured


def test_better_treatment_promotion_moves_the_registry_alias(tmp_path, sim_plan, bundle_a, bundle_b) -> None:
    rep = rb.scenario_better(tmp_path, sim_plan, bundles=(bundle_a, bundle_b))
    assert rep.ok, rep.checks
    assert rep.measured["production_alias"]["reason"].startswith("rollout better-1: success")


def test_broken_treatment_is_back_on_control_within_a_tick(tmp_path, sim_plan) -> None:
    rep = rb.scenario_broken(tmp_path, sim_plan)
    assert rep.measured["virtual_s_first_failure_to_rollback"] <= rb.TICK_S
    assert "fallback_rate" in rep.measured["rollback_reason"]


def test_one_aa_run_concludes_without_promotion(tmp_path, sim_plan) -> None:
    short = sim_plan.model_copy(update={"max_duration_s": 2400.0})
    rep = rb.scenario_equal(tmp_path, short, runs=1)
    assert rep.measured["outcomes"] == {"concluded": 1}, rep.measured
    assert "no detectable difference" in rep.measured["example_reason"]


def test_a_failed_check_fails_the_report() -> None:
    rep = rb.Report("x")
    rep.check("fine", True)
    rep.check("broken", False)
    assert not rep.ok and not rb.print_summary([rep])
