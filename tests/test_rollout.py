"""The rollout plan and the controller's pure state machine (cotrr_ray.experiments.rollout), one rule at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cotrr_ray.experiments import stats as S
from cotrr_ray.experiments.rollout import (
    ArmObs,
    Command,
    Observations,
    RolloutPlan,
    Summary,
    check_command,
    load_plan,
    routing_for,
    start,
    step,
)

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "configs" / "rollouts").glob("*.yaml"))


def plan(**over) -> RolloutPlan:
    base = {
        "name": "t",
        "stages": [
            {"name": "shadow", "mode": "shadow", "rollout_percentage": 0, "min_duration_s": 10, "min_units": 5},
            {"name": "il", "mode": "interleave", "rollout_percentage": 10, "min_duration_s": 10, "min_units": 5},
            {"name": "5%", "mode": "ab", "rollout_percentage": 5, "min_duration_s": 10, "min_units": 5},
            {"name": "50%", "mode": "ab", "rollout_percentage": 50, "min_duration_s": 10, "min_units": 5},
        ],
        "guardrails": {
            "min_queries": 10,
            "max_fallback_rate": 0.05,
            "max_error_rate": 0.01,
            "max_latency_p99_ms": 100,
            "metrics": [{"metric": "clicks_per_query", "tau": 0.08}, {"metric": "mrr", "tau": 0.03}],
        },
        "success": {"from_stage": "50%", "tau": 0.08},
        "srm_min_units": 100,
        "max_duration_s": 1000,
    }
    base.update(over)
    return RolloutPlan.model_validate(base)


def arm(units=100, queries=200, fallbacks=0, errors=0, p99=20.0) -> ArmObs:
    return ArmObs(units=units, queries=queries, fallbacks=fallbacks, errors=errors, latency_p99_ms=p99)


def summ(mean: float, n: int = 500, sd: float = 0.8) -> Summary:
    return Summary(n=n, mean=mean, var_of_mean=sd * sd / n)


def obs_for(p: RolloutPlan, s, *, treat=None, control=None, diff=None, pref=None, multi=0) -> Observations:
    """A healthy window of the state's stage: both arms in proportion, equal metrics unless told."""
    stage = p.stages[s.stage_index]
    share = stage.rollout_percentage / 100
    exposed = {"shadow": None, "interleave": "interleave", "ab": "treatment"}[stage.mode]
    arms = {"control": control or arm(units=round(1000 * (1 - share)), queries=2000)}
    if exposed:
        arms[exposed] = treat or arm(units=max(round(1000 * share), 50), queries=max(round(2000 * share), 100))
    metrics = {}
    if stage.mode == "ab":
        metrics = {
            m: {"control": summ(0.5), "treatment": summ(0.5 + (diff or 0.0))} for m in ("clicks_per_query", "mrr")
        }
    preference = summ(pref if pref is not None else 0.0, n=200) if stage.mode == "interleave" else None
    return Observations(
        stage_index=s.stage_index, since=s.stage_entered_at, arms=arms, all_units=1000,
        units_in_multiple_arms=multi, metrics=metrics, preference=preference,
    )  # fmt: skip


def cmd(action: str, at: float, stage: str | None = None, cid: str | None = None) -> Command:
    return Command(id=cid or f"{action}-{at}", action=action, stage=stage, reason="test", actor="operator:ann", at=at)


def run_to(p: RolloutPlan, index: int, t0: float = 0.0):
    """Start and advance with healthy windows until the stage `index` is entered; returns (state, now)."""
    s, _ = start(p, "exp-1", t0)
    now = t0
    while s.stage_index < index:
        now += 11
        s, ds = step(p, s, obs_for(p, s), now)
        assert ds and ds[-1].action == "advance", ds
    return s, now


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_shipped_plans_load(path: Path) -> None:
    p = load_plan(path)
    assert p.stages and p.success.from_stage in [s.name for s in p.stages]
    assert PLANS, "configs/rollouts/ ships at least one plan"


def test_every_plan_field_has_a_description() -> None:
    from cotrr_ray.experiments import rollout as R

    for model in (R.Stage, R.MetricGuardrail, R.Guardrails, R.SuccessRule, R.RolloutPlan, R.Command):
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: {missing}"


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"stages": [{"name": "a", "mode": "ab", "rollout_percentage": 100, "min_duration_s": 0, "min_units": 0}]},
         "both arms"),
        ({"stages": [{"name": "a", "mode": "shadow", "rollout_percentage": 5, "min_duration_s": 0, "min_units": 0}]},
         "exposes nobody"),
        ({"stages": [{"name": "50%", "mode": "ab", "rollout_percentage": 5.001, "min_duration_s": 0,
                      "min_units": 0}]}, "multiple of 0.01"),
        ({"success": {"from_stage": "nope"}}, "not a stage"),
        ({"success": {"from_stage": "il"}}, "must be an ab stage"),
        ({"max_duration_s": 0}, "max_duration_s"),
        ({"bogus": 1}, "bogus"),
    ],
)  # fmt: skip
def test_bad_plans_name_the_problem(over, fragment) -> None:
    with pytest.raises(ValidationError, match=fragment):
        plan(**over)


def test_duplicate_stage_names_are_refused() -> None:
    stages = [{"name": "50%", "mode": "ab", "rollout_percentage": 50, "min_duration_s": 0, "min_units": 0}] * 2
    with pytest.raises(ValidationError, match="unique"):
        plan(stages=stages)


# ----------------------------------------------------------------------------- advance and hold


def test_start_is_stage_zero_in_shadow() -> None:
    p = plan()
    s, ds = start(p, "exp-1", 5.0)
    assert (s.state, s.stage_index, s.seq, [d.action for d in ds]) == ("running", 0, 1, ["start"])
    assert routing_for(p, s) == {"rollout_percentage": 0.0, "shadow_mode": True, "mode": "ab"}


def test_experiment_ids_must_be_path_safe() -> None:
    with pytest.raises(ValueError, match="experiment id"):
        start(plan(), "../etc", 0.0)


def test_no_advance_before_min_duration_or_min_units() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    early, ds = step(p, s, obs_for(p, s), s.stage_entered_at + 5)
    assert not ds and early.stage_index == 2
    few = obs_for(p, s, treat=arm(units=3, queries=100), control=arm(units=60))  # 63 units: SRM not run yet
    later, ds = step(p, s, few, s.stage_entered_at + 50)
    assert not ds and later.stage_index == 2


def test_healthy_ramp_advances_stage_by_stage_with_routing() -> None:
    p = plan()
    s, now = run_to(p, 3)
    assert [t.stage for t in s.timeline] == ["shadow", "il", "5%", "50%"]
    assert all(t.left_at is not None for t in s.timeline[:-1]) and s.timeline[-1].left_at is None
    assert routing_for(p, s) == {"rollout_percentage": 50.0, "shadow_mode": False, "mode": "ab"}
    il = s.model_copy(update={"stage_index": 1})
    assert routing_for(p, il)["mode"] == "interleave"
    assert s.seq == 4  # start + 3 advances


def test_insufficient_guardrail_data_blocks_advancing() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    thin = obs_for(p, s, treat=arm(units=20, queries=5), control=arm(units=380))  # below guardrails.min_queries
    s2, ds = step(p, s, thin, s.stage_entered_at + 100)
    assert not ds and s2.stage_index == 2
    assert {g.name: g.status for g in s2.guardrails}["fallback_rate"] == "insufficient_data"


def test_a_window_of_another_stage_is_ignored() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    stale = obs_for(p, s).model_copy(update={"since": s.stage_entered_at - 11})
    s2, ds = step(p, s, stale, s.stage_entered_at + 100)
    assert not ds and s2.stage_index == 2


# ----------------------------------------------------------------------------- rollback


@pytest.mark.parametrize(
    ("treat", "name"),
    [
        (arm(queries=100, fallbacks=10), "fallback_rate"),
        (arm(queries=100, fallbacks=2, errors=2), "error_rate"),
        (arm(p99=250.0), "latency_p99_ms"),
    ],
)
def test_a_threshold_breach_rolls_back(treat, name) -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s2, ds = step(p, s, obs_for(p, s, treat=treat), s.stage_entered_at + 1)  # before min duration: at once
    assert [d.action for d in ds] == ["rollback"] and s2.state == "rolled_back"
    assert name in ds[0].reason and "5%" in ds[0].reason
    assert routing_for(p, s2) == {"rollout_percentage": 0.0, "shadow_mode": False, "mode": "ab"}
    assert {g.name: g.status for g in s2.guardrails}[name] == "breached"
    assert step(p, s2, obs_for(p, s2), s.stage_entered_at + 50)[1] == []  # terminal


def test_rollback_to_shadow_keeps_scoring_in_the_background() -> None:
    p = plan(rollback_to="shadow")
    s, _ = run_to(p, 2)
    s2, _ = step(p, s, obs_for(p, s, treat=arm(queries=100, fallbacks=50)), s.stage_entered_at + 1)
    assert routing_for(p, s2) == {"rollout_percentage": 0.0, "shadow_mode": True, "mode": "ab"}


def test_a_harmful_metric_rolls_back_through_the_one_sided_sequential_test() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s2, ds = step(p, s, obs_for(p, s, diff=-0.3), s.stage_entered_at + 1)
    assert [d.action for d in ds] == ["rollback"] and "harm_clicks_per_query" in ds[0].reason
    g = {g.name: g for g in s2.guardrails}["harm_clicks_per_query"]
    # two harm tests in each of the two A/B stages, one in the interleave stage: each at the Sidak share of 0.05
    assert g.threshold == pytest.approx(S.guardrail_alpha(0.05, 5)) and g.p_value <= g.threshold


def test_a_better_treatment_never_trips_the_harm_test() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s2, ds = step(p, s, obs_for(p, s, diff=+0.3), s.stage_entered_at + 1)
    assert ds == [] and {g.name: g.status for g in s2.guardrails}["harm_clicks_per_query"] == "ok"


def test_interleave_stage_tests_the_preference_for_harm() -> None:
    p = plan()
    s, _ = run_to(p, 1)
    s2, ds = step(p, s, obs_for(p, s, pref=-0.3), s.stage_entered_at + 1)
    assert [d.action for d in ds] == ["rollback"] and "harm_preference" in ds[0].reason


def test_the_running_minimum_p_value_persists_across_looks_of_a_stage() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s2, _ = step(p, s, obs_for(p, s, diff=-0.05), s.stage_entered_at + 1)
    p1 = s2.tests["harm:clicks_per_query"].p_value
    s3, _ = step(p, s2, obs_for(p, s2, diff=+0.05), s.stage_entered_at + 2)
    assert s3.tests["harm:clicks_per_query"].p_value == p1 and s3.tests["harm:clicks_per_query"].looks == 2


def test_guardrails_still_roll_back_while_paused() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s, _ = step(p, s, None, s.stage_entered_at + 1, [cmd("pause", 1.0)])
    assert s.state == "paused"
    s2, ds = step(p, s, obs_for(p, s, treat=arm(queries=100, fallbacks=50)), s.stage_entered_at + 2)
    assert [d.action for d in ds] == ["rollback"]


# ----------------------------------------------------------------------------- SRM


def test_srm_halts_the_ramp_with_the_reason() -> None:
    p = plan()
    s, _ = run_to(p, 3)  # 50/50
    skewed = obs_for(p, s, treat=arm(units=400), control=arm(units=600))
    s2, ds = step(p, s, skewed, s.stage_entered_at + 100)
    assert [d.action for d in ds] == ["hold"] and s2.state == "paused" and s2.stage_index == 3
    assert "sample ratio mismatch" in ds[0].reason and "'treatment': 400" in ds[0].reason
    assert routing_for(p, s2)["rollout_percentage"] == 50.0  # halted, not rolled back
    s3, ds = step(p, s2, obs_for(p, s2), s.stage_entered_at + 200)
    assert ds == [] and s3.stage_index == 3  # stays put until an operator acts


def test_units_in_two_arms_flag_srm() -> None:
    p = plan()
    s, _ = run_to(p, 3)
    s2, ds = step(p, s, obs_for(p, s, treat=arm(units=500), control=arm(units=500), multi=3), s.stage_entered_at + 100)
    assert [d.action for d in ds] == ["hold"] and "3 units in more than one arm" in ds[0].reason


def test_srm_waits_for_enough_units() -> None:
    p = plan(srm_min_units=5000)
    s, _ = run_to(p, 3)
    skewed = obs_for(p, s, treat=arm(units=400), control=arm(units=600))
    assert step(p, s, skewed, s.stage_entered_at + 1)[1] == []


# ----------------------------------------------------------------------------- promote and conclude


def test_a_clear_winner_is_promoted_from_the_success_stage_only() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    s2, ds = step(p, s, obs_for(p, s, diff=+0.3), s.stage_entered_at + 100)
    assert [d.action for d in ds] == ["advance"]  # 5% is before from_stage: it only ramps
    s3, ds = step(p, s2, obs_for(p, s2, diff=+0.3), s2.stage_entered_at + 100)
    assert [d.action for d in ds] == ["promote"] and s3.state == "promoted"
    assert "confidence sequence" in ds[0].reason
    assert routing_for(p, s3) == {"rollout_percentage": 0.0, "shadow_mode": False, "mode": "ab"}


def test_min_effect_must_be_cleared() -> None:
    p = plan(success={"from_stage": "50%", "tau": 0.08, "min_effect": 0.5})
    s, _ = run_to(p, 3)
    assert step(p, s, obs_for(p, s, diff=+0.3), s.stage_entered_at + 100)[1] == []


def test_equal_arms_end_at_max_duration_without_promotion() -> None:
    p = plan()
    s, now = run_to(p, 3)
    for t in range(int(now) + 50, 1000, 50):
        s, ds = step(p, s, obs_for(p, s), float(t))
        assert ds == []
    s, ds = step(p, s, obs_for(p, s), 1000.0)
    assert [d.action for d in ds] == ["conclude"] and s.state == "concluded"
    assert "no detectable difference" in ds[0].reason and "confidence sequence" in ds[0].reason


# ----------------------------------------------------------------------------- operator


def test_pause_resume_restarts_the_stage_window() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    entered = s.stage_entered_at
    s, ds = step(p, s, obs_for(p, s), entered + 100, [cmd("pause", 1.0)])
    assert [d.action for d in ds] == ["pause"] and s.state == "paused" and ds[0].actor == "operator:ann"
    s, ds = step(p, s, obs_for(p, s), entered + 200)
    assert ds == [] and s.stage_index == 2  # paused: no advance
    s, ds = step(p, s, None, entered + 300, [cmd("resume", 2.0)])
    assert [d.action for d in ds] == ["resume"] and s.state == "running" and s.stage_entered_at == entered + 300


def test_abort_and_force_and_replayed_commands() -> None:
    p = plan()
    s, _ = run_to(p, 2)
    c = cmd("abort", 1.0)
    s, ds = step(p, s, None, 100.0, [c])
    assert [d.action for d in ds] == ["abort"] and s.state == "aborted" and ds[0].command_id == c.id
    s2, ds = step(p, s, None, 101.0, [c])
    assert ds == []  # a command is applied once, even when read again
    s3, ds = step(p, s2, None, 102.0, [cmd("force", 3.0, stage="shadow")])
    assert [d.action for d in ds] == ["force"] and (s3.state, s3.stage_index) == ("running", 0)


def test_commands_refused_up_front_say_why() -> None:
    names = [st.name for st in plan().stages]
    assert check_command(names, "running", cmd("resume", 1.0)) == "cannot resume an experiment that is running"
    assert "no stage" in check_command(names, "running", cmd("force", 1.0, stage="99%"))
    assert check_command(names, None, cmd("pause", 1.0)).startswith("no controller state")
    assert check_command(names, "running", cmd("pause", 1.0)) is None
    assert check_command(names, "rolled_back", cmd("force", 1.0, stage="5%")) is None
    assert "promoted" in check_command(names, "promoted", cmd("force", 1.0, stage="5%"))


def test_a_scorer_failing_every_request_trips_before_min_queries() -> None:
    p = plan()  # min_queries 10
    s, _ = run_to(p, 2)
    s2, ds = step(p, s, obs_for(p, s, treat=arm(units=6, queries=6, fallbacks=6, errors=6)), s.stage_entered_at + 1)
    assert [d.action for d in ds] == ["rollback"] and "lower confidence bound" in ds[0].reason
    # one fallback in 6 answers is no evidence yet: wait for min_queries
    one = obs_for(p, s, treat=arm(units=6, queries=6, fallbacks=1), control=arm(units=80))  # SRM not run yet
    s3, ds = step(p, s, one, s.stage_entered_at + 1)
    assert ds == [] and {g.name: g.status for g in s3.guardrails}["fallback_rate"] == "insufficient_data"
