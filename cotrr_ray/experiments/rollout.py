"""A staged rollout as data and a pure state machine: the plan, the controller's state, and `step`.

    plan = load_plan("configs/rollouts/default.yaml")
    state, decisions = start(plan, "rerank-v2", now)
    state, decisions = step(plan, state, observations, now, commands)   # on every tick

`step` does no I/O and reads no clock: the controller (`experiments.controller`) computes the
`Observations` of the current stage from the event log (DuckDB), passes the operator commands it
found, persists every returned decision, then makes Serve's config match `routing_for(plan, state)`.
That split is what makes the rules testable exhaustively, one tick at a time.

Rules of one tick, in order (the first that fires ends the evaluation):
1. operator commands, oldest first: pause (running -> paused), resume (paused -> running, the
   stage re-entered so its window starts afresh), abort (-> aborted), force (-> running at the named
   stage, from any state but promoted);
2. the maximum duration: -> concluded, "no detectable difference" (never a promotion);
3. guardrails of a stage that shows the treatment to someone (interleave, ab): a breach -> rolled_back
   (also while paused: a person watching does not switch the circuit breaker off);
4. (running only) SRM of the stage's exposed units against its split: flagged -> paused with the
   reason ("hold"): the split is broken, so no test of this stage can be trusted until a person
   resumes (a fresh window) or aborts;
5. success, at and after `success.from_stage`: the sequential test of the primary metric rejects
   upwards with the confidence sequence above `min_effect`, once the stage's minimum duration and
   units are reached -> promoted (each such A/B stage tests at `success_alpha`, the plan's alpha split
   over them, so that the ramp as a whole promotes an equal treatment with probability <= alpha);
6. advance, once the stage's minimum duration and units are reached and every guardrail is ok
   (not breached, not short of data; a shadow stage has no exposed arm and needs time and volume only).

Guardrails of a stage with an exposed arm: the exposed arm's fallback rate (every upstream-order
answer), error rate (fallbacks from scorer errors, not timeouts) and p99 latency against absolute
thresholds, judged once the arm has `min_queries`; and the harm tests: each metric of
`guardrails.metrics` (A/B stages; higher is better) with a one-sided mSPRT ("treatment below
control"), and the per-unit interleaving preference in an interleave stage, each at the level
`harm_alpha(plan)` = `stats.guardrail_alpha(alpha, k)` for the k harm tests of all stages together
(every stage is a new window, so a new family of tests). The sequential tests are per
stage (a stage's window has one split, so units are in one arm); the always-valid p-value is the
running minimum over the ticks of the stage, kept in the state.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats as sps

from cotrr_ray.experiments import stats as S

Mode = Literal["shadow", "interleave", "ab"]
Action = Literal["start", "advance", "hold", "rollback", "promote", "pause", "resume", "abort", "force", "conclude"]
StateName = Literal["running", "paused", "promoted", "rolled_back", "aborted", "concluded"]
TERMINAL = frozenset({"promoted", "rolled_back", "aborted", "concluded"})
METRICS = ("clicks_per_query", "ctr_at_k", "mrr")
CONTROLLER = "controller"
# The experiment id names files and directories (status.json, decision records): one path segment.
EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_experiment_id(experiment_id: str) -> str:
    if not EXPERIMENT_ID.match(experiment_id or ""):
        raise ValueError(
            f"experiment id {experiment_id!r}: 1-128 of letters, digits, '.', '_', '-' (starting with a letter "
            "or digit), because it names the controller's files"
        )
    return experiment_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ============================================================================ the plan


class Stage(_Strict):
    """One step of the ramp."""

    name: str = Field(min_length=1, max_length=64, description="Shown in the status, the page and the decisions.")
    mode: Mode = Field(
        description=(
            "'shadow': everyone sees the control, the treatment scores in the background; 'interleave': the "
            "exposed units see the team-draft merge of both rankers; 'ab': the exposed units see the treatment."
        )
    )
    rollout_percentage: float = Field(
        ge=0,
        le=100,
        description="Share of units exposed (the Router's rollout_percentage, a multiple of 0.01); 0 in shadow.",
    )
    min_duration_s: float = Field(ge=0, description="Seconds the stage lasts at least before it may advance.")
    min_units: int = Field(
        ge=0,
        description=(
            "Distinct exposed units (all units in shadow) the stage's window needs before it may advance or promote."
        ),
    )

    @model_validator(mode="after")
    def _split(self) -> Stage:
        p = self.rollout_percentage
        if abs(p * 100 - round(p * 100)) > 1e-6:
            raise ValueError(f"stage {self.name!r}: rollout_percentage {p} is not a multiple of 0.01")
        if self.mode == "shadow" and p != 0:
            raise ValueError(f"stage {self.name!r}: a shadow stage exposes nobody; rollout_percentage must be 0")
        if self.mode == "ab" and not 0 < p < 100:
            raise ValueError(f"stage {self.name!r}: an ab stage needs both arms, 0 < rollout_percentage < 100")
        if self.mode == "interleave" and not 0 < p <= 100:
            raise ValueError(f"stage {self.name!r}: an interleave stage needs 0 < rollout_percentage <= 100")
        return self


class MetricGuardrail(_Strict):
    """A primary online metric tested one-sided for harm with the mSPRT in every A/B stage."""

    metric: Literal["clicks_per_query", "ctr_at_k", "mrr"] = Field(
        description="Per-unit ratio metric (delta method), higher is better; see experiments.analysis."
    )
    tau: float = Field(
        gt=0,
        description=(
            "mSPRT mixture scale, chosen before the experiment (stats.default_tau): near the smallest harm worth "
            "stopping for, in the metric's units."
        ),
    )


class Guardrails(_Strict):
    """When the treatment is unhealthy: any breach rolls the rollout back."""

    max_fallback_rate: float = Field(
        0.05, ge=0, le=1, description="Exposed arm's share of answers in upstream order (timeouts and errors)."
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Exposed arm's share of answers that fell back because its scorer raised."
    )
    max_latency_p99_ms: float = Field(500.0, gt=0, description="Exposed arm's p99 Router handling time, ms.")
    min_queries: int = Field(
        30, ge=1, description="Exposed-arm queries of the stage before the rate and latency guardrails are judged."
    )
    early_breach_confidence: float = Field(
        0.999,
        gt=0.5,
        lt=1,
        description=(
            "A rate guardrail trips before min_queries when its one-sided Clopper-Pearson lower bound at this "
            "confidence is above the threshold (a scorer failing every request is stopped at the first look)."
        ),
    )
    metrics: list[MetricGuardrail] = Field(
        default_factory=lambda: [MetricGuardrail(metric="clicks_per_query", tau=0.08)],
        description="Harm tests of the A/B stages (one-sided mSPRT, treatment below control).",
    )
    tau_preference: float = Field(
        0.07, gt=0, description="mSPRT mixture scale of the per-unit interleaving preference (interleave stages)."
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Family-wise level of all harm tests of the ramp (false rollbacks), split by stats.guardrail_alpha.",
    )


class SuccessRule(_Strict):
    """When the treatment has won: the primary metric's mSPRT rejects upwards in an A/B stage."""

    metric: Literal["clicks_per_query", "ctr_at_k", "mrr"] = Field(
        "clicks_per_query", description="The primary metric (per-unit ratio, higher is better)."
    )
    tau: float = Field(0.08, gt=0, description="mSPRT mixture scale of the success test (chosen beforehand).")
    alpha: float = Field(
        0.05, gt=0, lt=1,
        description="False-promotion level of the ramp (two-sided mSPRT; split over the A/B stages from from_stage).",
    )  # fmt: skip
    min_effect: float = Field(
        0.0, description="Promote only when the confidence sequence's lower end exceeds this (metric units)."
    )
    from_stage: str = Field(description="Name of the first (ab) stage at which a promotion may be decided.")


class RolloutPlan(_Strict):
    """A staged rollout: stages in order, guardrails, the success rule, and when to give up."""

    name: str = Field("default", min_length=1, description="The plan's name (status and page).")
    stages: list[Stage] = Field(min_length=1, description="The ramp, in order (e.g. shadow, interleave, 5%, 20%, 50%).")
    guardrails: Guardrails = Field(default_factory=Guardrails, description="What rolls the treatment back.")
    success: SuccessRule = Field(description="What promotes the treatment (moves the production alias).")
    srm_alpha: float = Field(0.001, gt=0, lt=1, description="SRM alarm level over a stage's exposed units.")
    srm_min_units: int = Field(100, ge=1, description="Units of a stage's window before its SRM check runs.")
    k: int = Field(10, ge=1, description="Cut-off of CTR@k.")
    max_duration_s: float = Field(
        gt=0, description="Seconds after the start at which the rollout ends as 'no detectable difference'."
    )
    rollback_to: Literal["off", "shadow"] = Field(
        "off", description="After a rollback: rollout 0 ('off'), or rollout 0 with the treatment in shadow."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RolloutPlan:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.success.from_stage not in names:
            raise ValueError(f"success.from_stage {self.success.from_stage!r} is not a stage ({names})")
        if self.stages[self.stage_index(self.success.from_stage)].mode != "ab":
            raise ValueError(f"success.from_stage {self.success.from_stage!r} must be an ab stage")
        return self

    def stage_index(self, name: str) -> int:
        for i, s in enumerate(self.stages):
            if s.name == name:
                return i
        raise ValueError(f"no stage {name!r} in plan {self.name!r} ({[s.name for s in self.stages]})")

    def summary(self) -> dict[str, Any]:
        """The plan as the status document shows it (contract15)."""
        return {
            "name": self.name,
            "max_duration_s": self.max_duration_s,
            "stages": [s.model_dump() for s in self.stages],
        }


def load_plan(path: str | Path) -> RolloutPlan:
    return RolloutPlan.model_validate(yaml.safe_load(Path(path).read_text()))


# ============================================================================ state, inputs, outputs


class TestState(_Strict):
    """A sequential test across the ticks of one stage (None bounds: unbounded; JSON has no inf)."""

    p_value: float = 1.0
    ci_low: float | None = None
    ci_high: float | None = None
    looks: int = 0
    dhat: float | None = None


class TimelineEntry(_Strict):
    stage: str
    index: int
    entered_at: float
    left_at: float | None = None
    reason: str | None = None


class GuardrailStatus(_Strict):
    name: str
    value: float | None = None
    threshold: float | None = None
    status: Literal["ok", "breached", "insufficient_data"]
    p_value: float | None = None
    detail: str = ""


class Decision(_Strict):
    """One change the controller made (or refused to make), with its reason."""

    seq: int = Field(ge=1, description="1, 2, ... per experiment; a record per seq exists at most once.")
    at: float
    action: Action
    from_stage: str | None
    to_stage: str | None
    reason: str
    actor: str = CONTROLLER
    command_id: str | None = None


class ControllerState(_Strict):
    version: int = 1
    experiment_id: str
    state: StateName
    stage_index: int
    stage_entered_at: float
    started_at: float
    seq: int = 0
    timeline: list[TimelineEntry] = Field(default_factory=list)
    tests: dict[str, TestState] = Field(default_factory=dict)
    guardrails: list[GuardrailStatus] = Field(default_factory=list)
    consumed: list[str] = Field(default_factory=list)  # command ids applied lately (bounded)
    promoted_bundle: str | None = None


class Command(_Strict):
    """An operator's request, queued beside the event log (CLI or admin HTTP) and applied at the next tick."""

    id: str = Field(min_length=1, max_length=128, description="Unique; a command is applied once.")
    action: Literal["pause", "resume", "abort", "force"] = Field(description="What to do.")
    stage: str | None = Field(None, description="force: the stage to go to.")
    reason: str = Field("", max_length=1000, description="Why; recorded with the decision.")
    actor: str = Field("operator", min_length=1, max_length=128, description="Who: 'operator:<name>'.")
    at: float = Field(description="When it was submitted (Unix seconds).")


class ArmObs(_Strict):
    """One arm of the stage's window: volumes and health."""

    units: int
    queries: int
    fallbacks: int
    errors: int
    latency_p99_ms: float | None


class Summary(_Strict):
    """`stats.ArmSummary` as data."""

    n: int
    mean: float
    var_of_mean: float

    def arm(self) -> S.ArmSummary:
        return S.ArmSummary(self.n, self.mean, self.var_of_mean, "ratio")


class Observations(_Strict):
    """What the event log says about the current stage since it was entered (one split, one mode)."""

    stage_index: int = Field(description="The stage the window was cut for; another stage's window is ignored.")
    since: float = Field(description="The window's start: the stage's entered_at.")
    arms: dict[str, ArmObs] = Field(default_factory=dict, description="control, treatment or interleave.")
    units_in_multiple_arms: int = 0
    all_units: int = Field(0, description="Distinct units of the window, any arm.")
    metrics: dict[str, dict[str, Summary]] = Field(
        default_factory=dict, description="metric -> {'control': ..., 'treatment': ...} per-unit ratio summaries."
    )
    preference: Summary | None = Field(None, description="Per-unit interleaving preference (h_T - h_C), if any.")


# ============================================================================ pure rules


def exposed_arm(stage: Stage) -> str | None:
    return {"shadow": None, "interleave": "interleave", "ab": "treatment"}[stage.mode]


def routing_for(plan: RolloutPlan, state: ControllerState) -> dict[str, Any]:
    """The Router user_config fields the state wants (the rest of the config is left as it is)."""
    off = {"rollout_percentage": 0.0, "shadow_mode": False, "mode": "ab"}
    if state.state in ("running", "paused"):
        stage = plan.stages[state.stage_index]
        if stage.mode == "shadow":
            return {"rollout_percentage": 0.0, "shadow_mode": True, "mode": "ab"}
        return {"rollout_percentage": stage.rollout_percentage, "shadow_mode": False, "mode": stage.mode}
    if state.state == "rolled_back" and plan.rollback_to == "shadow":
        return {**off, "shadow_mode": True}
    return off  # promoted (control now serves the winner), aborted, concluded, rolled back


def start(plan: RolloutPlan, experiment_id: str, now: float) -> tuple[ControllerState, list[Decision]]:
    """The first state (stage 0) and its 'start' decision."""
    check_experiment_id(experiment_id)
    first = plan.stages[0]
    state = ControllerState(
        experiment_id=experiment_id,
        state="running",
        stage_index=0,
        stage_entered_at=now,
        started_at=now,
        timeline=[TimelineEntry(stage=first.name, index=0, entered_at=now)],
    )
    return state, [_decide(state, now, "start", None, first.name, f"plan {plan.name!r} started at {first.name!r}")]


def step(
    plan: RolloutPlan,
    state: ControllerState,
    obs: Observations | None,
    now: float,
    commands: list[Command] | tuple[Command, ...] = (),
) -> tuple[ControllerState, list[Decision]]:
    """One tick: the new state and the decisions that led to it (empty when nothing changed)."""
    s = state.model_copy(deep=True)
    out: list[Decision] = []
    for cmd in sorted(commands, key=lambda c: (c.at, c.id)):
        if cmd.id in s.consumed:
            continue
        d = _command(plan, s, cmd, now)
        s.consumed = (s.consumed + [cmd.id])[-200:]
        if d is not None:
            out.append(d)
    if s.state in TERMINAL:
        return s, out
    if obs is not None and (obs.stage_index != s.stage_index or obs.since != s.stage_entered_at):
        obs = None  # cut for another stage (a command moved us this tick): judge it next tick
    d = _evaluate(plan, s, obs, now)
    if d is not None:
        out.append(d)
    return s, out


def _evaluate(plan: RolloutPlan, s: ControllerState, obs: Observations | None, now: float) -> Decision | None:
    stage = plan.stages[s.stage_index]
    if now - s.started_at >= plan.max_duration_s:
        return _finish(s, now, "conclude", "concluded", _no_difference(plan, s, now))
    s.guardrails = guardrail_status(plan, stage, obs, s.tests)
    breached = [g for g in s.guardrails if g.status == "breached"]
    if breached:
        why = "; ".join(f"{g.name}: {g.detail}" for g in breached)
        to = "shadow" if plan.rollback_to == "shadow" else "off"
        return _finish(s, now, "rollback", "rolled_back", f"guardrail breached at {stage.name!r} ({why}); {to}")
    if s.state != "running" or obs is None:
        return None
    srm = srm_status(plan, stage, obs)
    if srm is not None and srm.flagged:
        s.state = "paused"
        return _decide(s, now, "hold", stage.name, stage.name, f"ramp halted: sample ratio mismatch {_srm_text(srm)}")
    if not _minimum_reached(stage, s, obs, now):
        return None
    if s.stage_index >= plan.stage_index(plan.success.from_stage) and stage.mode == "ab":
        won = _success(plan, s, obs)
        if won is not None:
            return _finish(s, now, "promote", "promoted", f"success at {stage.name!r}: {won}")
    if s.stage_index + 1 < len(plan.stages) and all(g.status == "ok" for g in s.guardrails):
        return _enter(s, now, s.stage_index + 1, plan, "advance", "min duration and units reached, guardrails ok")
    if stage.mode == "shadow" and s.stage_index + 1 < len(plan.stages):
        return _enter(s, now, s.stage_index + 1, plan, "advance", "min duration and units reached (shadow)")
    return None


def _minimum_reached(stage: Stage, s: ControllerState, obs: Observations, now: float) -> bool:
    arm = exposed_arm(stage)
    units = obs.all_units if arm is None else (obs.arms[arm].units if arm in obs.arms else 0)
    return now - s.stage_entered_at >= stage.min_duration_s and units >= stage.min_units


def _command(plan: RolloutPlan, s: ControllerState, cmd: Command, now: float) -> Decision | None:
    stage = plan.stages[s.stage_index].name
    why = f" ({cmd.reason})" if cmd.reason else ""
    if cmd.action == "pause" and s.state == "running":
        s.state = "paused"
        return _decide(s, now, "pause", stage, stage, f"paused by {cmd.actor}{why}", cmd)
    if cmd.action == "resume" and s.state == "paused":
        s.state = "running"
        return _enter(
            s, now, s.stage_index, plan, "resume", f"resumed by {cmd.actor}, stage window restarted{why}", cmd
        )
    if cmd.action == "abort" and s.state not in TERMINAL:
        return _finish(s, now, "abort", "aborted", f"aborted by {cmd.actor}{why}", cmd)
    if cmd.action == "force" and s.state != "promoted" and cmd.stage is not None:
        try:
            target = plan.stage_index(cmd.stage)
        except ValueError:
            return None  # refused when submitted (`check_command`); a plan changed since: ignored
        s.state = "running"
        return _enter(s, now, target, plan, "force", f"forced to {cmd.stage!r} by {cmd.actor}{why}", cmd)
    return None


def check_command(stages: list[str], state: StateName | None, cmd: Command) -> str | None:
    """Why `cmd` cannot apply to an experiment in `state` with these stage names (None: it can); the CLI
    and the admin API refuse it up front, so that a person hears why at once."""
    if cmd.action == "force":
        if cmd.stage is None:
            return "force needs a stage"
        if cmd.stage not in stages:
            return f"no stage {cmd.stage!r} in the plan ({stages})"
        return "the experiment was promoted; start a new one (a new experiment_salt)" if state == "promoted" else None
    if state is None:
        return "no controller state yet: the controller has not started this experiment"
    allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused")}[cmd.action]
    return None if state in allowed else f"cannot {cmd.action} an experiment that is {state}"


def _decide(
    s: ControllerState, now: float, action: Action, frm: str | None, to: str | None, reason: str, cmd=None
) -> Decision:
    s.seq += 1
    actor = cmd.actor if cmd is not None else CONTROLLER
    return Decision(
        seq=s.seq, at=now, action=action, from_stage=frm, to_stage=to, reason=reason, actor=actor,
        command_id=cmd.id if cmd is not None else None,
    )  # fmt: skip


def _close_timeline(s: ControllerState, now: float, reason: str) -> None:
    if s.timeline and s.timeline[-1].left_at is None:
        s.timeline[-1].left_at, s.timeline[-1].reason = now, reason


def _enter(s: ControllerState, now: float, index: int, plan: RolloutPlan, action: Action, reason: str, cmd=None):
    frm = plan.stages[s.stage_index].name
    to = plan.stages[index].name
    _close_timeline(s, now, reason)
    s.stage_index, s.stage_entered_at, s.tests = index, now, {}
    s.timeline.append(TimelineEntry(stage=to, index=index, entered_at=now))
    return _decide(s, now, action, frm, to, reason, cmd)


def _finish(s: ControllerState, now: float, action: Action, to_state: StateName, reason: str, cmd=None) -> Decision:
    frm = s.timeline[-1].stage if s.timeline else None
    _close_timeline(s, now, reason)
    s.state = to_state
    return _decide(s, now, action, frm, None, reason, cmd)


# ----------------------------------------------------------------------------- guardrails and tests


def _rate_guardrail(name: str, count: int, arm: ArmObs, threshold: float, g: Guardrails) -> GuardrailStatus:
    """Breached once the rate is over the threshold with `min_queries` answers, or earlier when even
    the one-sided lower confidence bound of the rate (Clopper-Pearson at `early_breach_confidence`)
    is over it: 15 failures in 15 answers trip the breaker at the first look, not after min_queries."""
    n = arm.queries
    rate = count / n if n else None
    lower = float(sps.beta.ppf(1 - g.early_breach_confidence, count, n - count + 1)) if count else 0.0
    detail = f"{count}/{n} = {rate:.4f} vs max {threshold:g}" if n else "no answers yet"
    if n and lower > threshold:
        return GuardrailStatus(name=name, value=rate, threshold=threshold, status="breached",
                               detail=f"{detail} (lower confidence bound {lower:.3f})")  # fmt: skip
    if n < g.min_queries:
        return GuardrailStatus(
            name=name, value=rate, threshold=threshold, status="insufficient_data",
            detail=f"{n} of {g.min_queries} queries",
        )  # fmt: skip
    return GuardrailStatus(name=name, value=rate, threshold=threshold,
                           status="breached" if rate > threshold else "ok", detail=detail)  # fmt: skip


def _latency_guardrail(arm: ArmObs, g: Guardrails) -> GuardrailStatus:
    name, thr = "latency_p99_ms", g.max_latency_p99_ms
    if arm.queries < g.min_queries or arm.latency_p99_ms is None:
        return GuardrailStatus(
            name=name, threshold=thr, status="insufficient_data", detail=f"{arm.queries} of {g.min_queries} queries"
        )
    v = arm.latency_p99_ms
    return GuardrailStatus(
        name=name, value=v, threshold=thr, status="breached" if v > thr else "ok",
        detail=f"p99 {v:.1f} ms vs max {thr:g} ms",
    )  # fmt: skip


def _update_test(
    tests: dict[str, TestState], key: str, control: S.ArmSummary | None, treatment: S.ArmSummary | None, *,
    diff: S.ArmSummary | None = None, tau: float, alpha: float, alternative: S.Alternative,
) -> TestState | None:  # fmt: skip
    """One look of a per-stage sequential test; None when the look has no variance (not enough data)."""
    prev = tests.get(key, TestState())
    if diff is not None:
        if diff.n < 2 or diff.var_of_mean <= 0:
            return None
        r = S.msprt_paired(diff, tau=tau, alpha=alpha, alternative=alternative, previous_p=prev.p_value)
    else:
        if control is None or treatment is None or control.var_of_mean + treatment.var_of_mean <= 0:
            return None
        r = S.msprt(control, treatment, tau=tau, alpha=alpha, alternative=alternative, previous_p=prev.p_value)
    lo = r.ci_low if prev.ci_low is None else max(prev.ci_low, r.ci_low)
    hi = r.ci_high if prev.ci_high is None else min(prev.ci_high, r.ci_high)
    new = TestState(
        p_value=r.p_value, ci_low=lo if math.isfinite(lo) else None, ci_high=hi if math.isfinite(hi) else None,
        looks=prev.looks + 1, dhat=r.dhat,
    )  # fmt: skip
    tests[key] = new
    return new


def _metric_arms(obs: Observations, metric: str) -> tuple[S.ArmSummary | None, S.ArmSummary | None]:
    m = obs.metrics.get(metric, {})
    c, t = m.get("control"), m.get("treatment")
    return (c.arm() if c else None), (t.arm() if t else None)


def _harm_guardrails(
    plan: RolloutPlan, stage: Stage, obs: Observations, tests: dict[str, TestState]
) -> list[GuardrailStatus]:
    g = plan.guardrails
    if stage.mode == "interleave":
        names = [("preference", g.tau_preference)]
    else:
        names = [(m.metric, m.tau) for m in g.metrics]
    if not names:
        return []
    alpha_k = harm_alpha(plan)
    out = []
    for metric, tau in names:
        key = f"harm:{metric}"
        if metric == "preference":
            diff = obs.preference.arm() if obs.preference is not None else None
            t = _update_test(tests, key, None, None, diff=diff, tau=tau, alpha=alpha_k, alternative="less")
        else:
            c, tr = _metric_arms(obs, metric)
            t = _update_test(tests, key, c, tr, tau=tau, alpha=alpha_k, alternative="less")
        name = f"harm_{metric}"
        if t is None:
            out.append(
                GuardrailStatus(name=name, threshold=alpha_k, status="insufficient_data", detail="no variance yet")
            )
            continue
        breached = t.p_value <= alpha_k
        out.append(
            GuardrailStatus(
                name=name,
                value=t.dhat,
                threshold=alpha_k,
                status="breached" if breached else "ok",
                p_value=t.p_value,
                detail=f"treatment - control {t.dhat:+.4g}, one-sided always-valid p {t.p_value:.3g} vs {alpha_k:.4g}",
            )  # fmt: skip
        )
    return out


def _harm_tests(plan: RolloutPlan, stage: Stage) -> int:
    return {"shadow": 0, "interleave": 1, "ab": len(plan.guardrails.metrics)}[stage.mode]


def harm_alpha(plan: RolloutPlan) -> float:
    """The level of each harm test: `guardrails.alpha` split (Sidak) over every harm test of every stage
    (each stage's window is a new family), so that an equal treatment is rolled back by a false alarm
    with probability <= alpha over the whole ramp."""
    return S.guardrail_alpha(plan.guardrails.alpha, max(1, sum(_harm_tests(plan, st) for st in plan.stages)))


def guardrail_status(
    plan: RolloutPlan, stage: Stage, obs: Observations | None, tests: dict[str, TestState]
) -> list[GuardrailStatus]:
    """Every guardrail of the stage, updating its sequential tests in `tests` (one look)."""
    g = plan.guardrails
    arm_name = exposed_arm(stage)
    names = ["fallback_rate", "error_rate", "latency_p99_ms"]
    if arm_name is None:
        return [GuardrailStatus(name=n, status="insufficient_data", detail="shadow: nobody is exposed") for n in names]
    arm = (obs.arms.get(arm_name) if obs is not None else None) or ArmObs(
        units=0, queries=0, fallbacks=0, errors=0, latency_p99_ms=None
    )
    out = [
        _rate_guardrail("fallback_rate", arm.fallbacks, arm, g.max_fallback_rate, g),
        _rate_guardrail("error_rate", arm.errors, arm, g.max_error_rate, g),
        _latency_guardrail(arm, g),
    ]
    if obs is not None:
        out += _harm_guardrails(plan, stage, obs, tests)
    return out


def srm_status(plan: RolloutPlan, stage: Stage, obs: Observations) -> S.SRMResult | None:
    """SRM of the window's distinct units per arm against the stage's split (None: not applicable yet)."""
    arm = exposed_arm(stage)
    share = stage.rollout_percentage / 100
    if arm is None or not 0 < share < 1:
        return None
    observed = {"control": obs.arms["control"].units if "control" in obs.arms else 0}
    observed[arm] = obs.arms[arm].units if arm in obs.arms else 0
    if sum(observed.values()) + obs.units_in_multiple_arms < plan.srm_min_units:
        return None
    weights = {"control": 1 - share, arm: share}
    return S.srm_check(observed, weights, alpha=plan.srm_alpha, units_in_multiple_arms=obs.units_in_multiple_arms)


def _srm_text(r: S.SRMResult) -> str:
    exp = {k: round(v, 1) for k, v in r.expected.items()}
    multi = f", {r.units_in_multiple_arms} units in more than one arm" if r.units_in_multiple_arms else ""
    return f"(units observed {r.observed}, expected {exp}, p={r.p_value:.3g} < {r.alpha:g}{multi})"


def success_alpha(plan: RolloutPlan) -> float:
    """The success test's level per stage: each A/B stage from `from_stage` on runs its own test (a new
    window, a new split), so `success.alpha` is split over them (Sidak) to bound a false promotion."""
    first = plan.stage_index(plan.success.from_stage)
    k = sum(1 for st in plan.stages[first:] if st.mode == "ab")
    return S.guardrail_alpha(plan.success.alpha, k)


def _success(plan: RolloutPlan, s: ControllerState, obs: Observations) -> str | None:
    rule = plan.success
    c, t = _metric_arms(obs, rule.metric)
    alpha = success_alpha(plan)
    r = _update_test(s.tests, f"success:{rule.metric}", c, t, tau=rule.tau, alpha=alpha, alternative="two-sided")
    if r is None or r.p_value > alpha or r.ci_low is None or r.ci_low <= rule.min_effect:
        return None
    if any(g.status != "ok" for g in s.guardrails):
        return None
    return (
        f"{rule.metric} treatment - control {r.dhat:+.4g}, confidence sequence [{r.ci_low:+.4g}, "
        f"{_fmt(r.ci_high)}] above {rule.min_effect:g}, always-valid p {r.p_value:.3g} <= {alpha:.4g}"
    )


def _fmt(v: float | None) -> str:
    return "inf" if v is None else f"{v:+.4g}"


def _no_difference(plan: RolloutPlan, s: ControllerState, now: float) -> str:
    t = s.tests.get(f"success:{plan.success.metric}")
    cs = (
        f"; last {plan.success.metric} difference {t.dhat:+.4g}, confidence sequence "
        f"[{_fmt(t.ci_low)}, {_fmt(t.ci_high)}]"
        if t is not None and t.dhat is not None
        else ""
    )
    return f"no detectable difference after {now - s.started_at:.0f} s (max_duration_s {plan.max_duration_s:g}){cs}"
