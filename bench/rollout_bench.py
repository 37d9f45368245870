#!/usr/bin/env python
"""Rollout controller scenarios: a plan driven by simulated traffic (offline) or by a live Serve app.

    python bench/rollout_bench.py offline [--quick] [--aa-runs N] [--json OUT]
    python bench/rollout_bench.py live [--quick] [--json OUT]          # starts a local Ray (integration)

Offline (Ray-free; `bench/rollout_sim.py` writes decision and feedback records into an event log
directory on a virtual clock, one controller tick per virtual minute, plan configs/rollouts/sim.yaml;
the controller is the real one: DuckDB over the log, the state machine, persisted decisions, with an
in-memory Router config as its actuator):

- broken: the treatment's scorer starts raising when the ramp enters 5%. Checks: a guardrail rolls
  back, the Router config is back on control (rollout 0), measured: virtual seconds from the first
  failed treatment answer to the rollback and the treatment answers served in upstream order until then.
- better: the treatment ranks with less noise (a known gap). Checks: it ramps through the stages and is
  promoted, never rolled back, and the promotion moved a real local registry's production alias (two
  tiny bundles published, production -> candidate); measured: the virtual time and the queries it took.
- equal (A/A): `--aa-runs` replays, each with its own seed and salt. Checks: none promotes beyond what
  the plan's alpha allows (the rate with its 95% Clopper-Pearson interval), each ends concluded with
  "no detectable difference" or (rarely, a false alarm) rolled back.
- kill: a better treatment; the controller object is dropped mid-ramp (at 20%) and a new one resumes
  from the files. Checks: same stage and entered_at, the decision seqs 1..n with no gap or duplicate.
- srm: the treatment's decision records are lost for 30% of its units (a logging bug). Checks: the ramp
  halts with "sample ratio mismatch" in the reason, the state is paused, the traffic split is unchanged.

Live: see `live_scenarios` (a Serve app deployed through the config path, the controller acting through
the dashboard's REST API; broken treatment and an admin-API check).

Writes bench/results/rollout-offline[-quick].json and prints PASS/FAIL lines (exit 1 on a failure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

from rollout_sim import T0, World, traffic  # noqa: E402
from scipy import stats as sps  # noqa: E402

from cotrr_ray.experiments.controller import Controller, MemoryActuator  # noqa: E402
from cotrr_ray.experiments.rollout import TERMINAL, RolloutPlan, load_plan  # noqa: E402

SIM_PLAN = REPO / "configs" / "rollouts" / "sim.yaml"
TICK_S = 60.0


@dataclass
class Report:
    scenario: str
    checks: list[tuple[str, bool]] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool) -> None:
        self.checks.append((name, bool(ok)))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)


class FakePromoter:
    def __init__(self) -> None:
        self.calls = 0

    def promote(self, reason: str) -> str:
        self.calls += 1
        return "treatment-bundle"


@dataclass
class Run:
    """One simulated rollout: the world, the log, the controller and what happened."""

    plan: RolloutPlan
    world: World
    log: Path
    salt: str
    now: float = T0
    actuator: MemoryActuator = field(default_factory=MemoryActuator)
    promoter: Any = field(default_factory=FakePromoter)
    decisions: list = field(default_factory=list)
    queries: int = 0

    def __post_init__(self) -> None:
        self.ctl = self.new_controller()
        self.ctl.load()

    def new_controller(self) -> Controller:
        return Controller(self.plan, str(self.log), self.salt, self.actuator, promoter=self.promoter,
                          clock=lambda: self.now)  # fmt: skip

    def tick(self) -> list:
        self.queries += traffic(self.world, self.log, self.actuator.routing(), self.salt, self.now, self.now + TICK_S)
        self.now += TICK_S
        ds = self.ctl.tick()
        self.decisions += ds
        return ds

    def until(self, done, max_ticks: int) -> bool:
        for _ in range(max_ticks):
            self.tick()
            if done(self):
                return True
        return False

    @property
    def state(self):
        return self.ctl.state

    def elapsed(self) -> float:
        return self.now - T0


def _max_ticks(plan: RolloutPlan) -> int:
    return int(plan.max_duration_s / TICK_S) + 2


def scenario_broken(workdir: Path, plan: RolloutPlan, seed: int = 11) -> Report:
    rep = Report("broken")
    run = Run(plan, World(seed=seed), workdir / "broken", "broken-1")
    break_at = plan.stage_index("5%")
    run.until(lambda r: r.state.stage_index >= break_at, _max_ticks(plan))
    run.world.broken_from = run.now  # the treatment raises from the moment 5% is entered
    run.until(lambda r: r.state.state in TERMINAL, _max_ticks(plan))
    last = run.decisions[-1]
    rep.check("a guardrail rolled the treatment back", last.action == "rollback" and "guardrail" in last.reason)
    rep.check("the Router config is back on control (rollout 0)", run.actuator.config["rollout_percentage"] == 0.0)
    first = run.world.first_failure
    rep.measured = {
        "rollback_reason": last.reason,
        "virtual_s_first_failure_to_rollback": None if first is None else round(last.at - first, 1),
        "tick_s": TICK_S,
        "min_queries": plan.guardrails.min_queries,
        "treatment_fallback_answers_before_rollback": _fallbacks(run.log, "broken-1"),
    }
    rep.check(
        "rolled back within two controller ticks of the first failure",
        first is not None and last.at - first <= 2 * TICK_S,
    )
    return rep


def _fallbacks(log: Path, salt: str) -> int:
    from cotrr_ray.experiments import analysis

    con = analysis.connect(str(log))
    n = con.execute(
        "SELECT count(*) FROM decisions WHERE experiment_salt = ? AND fallback AND arm <> 'control'", [salt]
    ).fetchall()[0][0]
    con.close()
    return int(n)


def registry_with(workdir: Path, control: Path, treatment: Path):
    """A local registry with `control` as production and `treatment` as candidate: what promotion moves."""
    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.bundles.registry import Registry

    reg = Registry(str(workdir / "registry"))
    for b in (control, treatment):
        reg.publish(b, "demo")
    reg.set_alias("demo", "production", read_meta(control).bundle_id)
    reg.set_alias("demo", "candidate", read_meta(treatment).bundle_id)
    return reg


def tiny_bundles(workdir: Path) -> tuple[Path, Path]:
    """Two tiny real bundles (tests/_bundles.py), for the registry the promotion moves."""
    sys.path.insert(0, str(REPO / "tests"))
    from _bundles import make_bundle, make_data

    data = make_data(workdir / "lists.jsonl")
    return make_bundle(workdir / "bundle-a", data, seed=0), make_bundle(workdir / "bundle-b", data, seed=1)


def scenario_better(workdir: Path, plan: RolloutPlan, seed: int = 12, bundles: tuple[Path, Path] | None = None):
    """With `bundles` (control, treatment), promotion moves a real registry's production alias
    (`serving.rollout.RegistryPromoter`); without, a stand-in counts the promotions."""
    from cotrr_ray.serving.rollout import RegistryPromoter

    rep = Report("better")
    reg = registry_with(workdir, *bundles) if bundles else None
    promoter = RegistryPromoter(reg.uri, "demo") if reg else FakePromoter()
    run = Run(plan, World(treatment_noise=0.5, seed=seed), workdir / "better", "better-1", promoter=promoter)
    run.until(lambda r: r.state.state in TERMINAL, _max_ticks(plan))
    actions = [d.action for d in run.decisions]
    stages = [t.stage for t in run.state.timeline]
    rep.check("promoted", run.state.state == "promoted" and actions.count("promote") == 1)
    if reg is not None:
        head = reg.head("demo", "production")
        rep.check("production now names the candidate, moved by the rollout",
                  head.bundle_id == reg.resolve("demo", "candidate") and head.reason.startswith("rollout better-1"))  # fmt: skip
        rep.measured["production_alias"] = {"bundle_id": head.bundle_id, "seq": head.seq, "reason": head.reason[:120]}
    rep.check("never rolled back", "rollback" not in actions)
    rep.check("ramped through the stages in order", stages == [s.name for s in plan.stages][: len(stages)])
    rep.measured |= {
        "virtual_s_to_promotion": run.elapsed(),
        "stages_traversed": stages,
        "queries_total": run.queries,
        "promote_reason": run.decisions[-1].reason if run.decisions else None,
        "treatment_answers": run.world.answered,
    }
    return rep


def scenario_equal(workdir: Path, plan: RolloutPlan, runs: int, seed: int = 100) -> Report:
    rep = Report("equal")
    outcomes: dict[str, int] = {}
    reasons = []
    t0 = time.perf_counter()
    for i in range(runs):
        run = Run(plan, World(seed=seed + i), workdir / f"aa-{i}", f"aa-{i}")
        run.until(lambda r: r.state.state in TERMINAL, _max_ticks(plan))
        outcomes[run.state.state] = outcomes.get(run.state.state, 0) + 1
        reasons.append(run.decisions[-1].reason if run.decisions else "")
        shutil.rmtree(workdir / f"aa-{i}", ignore_errors=True)
    promoted = outcomes.get("promoted", 0)
    lo, hi = sps.binomtest(promoted, runs).proportion_ci(0.95, method="exact")
    rep.measured = {
        "runs": runs,
        "outcomes": outcomes,
        "false_promotion_rate": promoted / runs,
        "false_promotion_ci95": [round(lo, 4), round(hi, 4)],
        "plan_alpha": plan.success.alpha,
        "example_reason": next((r for r in reasons if "no detectable difference" in r), None),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    # The guarantee is <= alpha; a count this high would be under 1% likely if it held.
    limit = int(sps.binom.ppf(0.99, runs, plan.success.alpha))
    rep.check(f"false promotions {promoted}/{runs} <= {limit} (99% bound at alpha {plan.success.alpha})",
              promoted <= limit)  # fmt: skip
    rep.check("the runs that did not promote end 'no detectable difference' or in a (false) rollback",
              outcomes.get("concluded", 0) + outcomes.get("rolled_back", 0) == runs - promoted)  # fmt: skip
    rep.check("most runs end 'no detectable difference'", outcomes.get("concluded", 0) >= 0.8 * runs)
    return rep


def scenario_kill(workdir: Path, plan: RolloutPlan, seed: int = 13) -> Report:
    rep = Report("kill")
    run = Run(plan, World(treatment_noise=0.5, seed=seed), workdir / "kill", "kill-1")
    mid = plan.stage_index("20%")
    run.until(lambda r: r.state.stage_index >= mid, _max_ticks(plan))
    before = (run.state.stage_index, run.state.stage_entered_at, run.state.seq)
    run.tick()  # one more look (tests move, no decision expected this early in the stage)
    looks = run.state.tests.get("harm:clicks_per_query")
    run.ctl = run.new_controller()  # the old object is gone, as after a kill; only the files remain
    resumed = run.ctl.load()
    rep.check("resumed at the same stage and entered_at", (resumed.stage_index, resumed.stage_entered_at) == before[:2])
    rep.check("resumed with the per-stage tests of the last look",
              looks is None or resumed.tests.get("harm:clicks_per_query") == looks)  # fmt: skip
    run.until(lambda r: r.state.state in TERMINAL, _max_ticks(plan))
    seqs = [r["seq"] for r in run.ctl.store.records()]
    rep.check("decision seqs are 1..n: no duplicate, no gap", seqs == list(range(1, len(seqs) + 1)))
    actions = [r["action"] for r in run.ctl.store.records()]
    rep.check("one start, and the ramp still finished", actions.count("start") == 1 and run.state.state in TERMINAL)
    rep.measured = {"killed_at_stage": plan.stages[before[0]].name, "decisions": actions, "final": run.state.state}
    return rep


def scenario_srm(workdir: Path, plan: RolloutPlan, seed: int = 14) -> Report:
    rep = Report("srm")
    run = Run(plan, World(seed=seed, lose_treatment_units=0.3), workdir / "srm", "srm-1")
    run.until(lambda r: r.state.state != "running", _max_ticks(plan))
    last = run.decisions[-1]
    rep.check("the ramp halted (hold, paused)", last.action == "hold" and run.state.state == "paused")
    rep.check("the reason names the sample ratio mismatch", "sample ratio mismatch" in last.reason)
    routing = dict(run.actuator.config)
    stage = run.state.stage_index
    for _ in range(5):
        run.tick()
    rep.check("it stays at that stage with the split unchanged",
              run.state.stage_index == stage and run.actuator.config == routing)  # fmt: skip
    rep.measured = {"reason": last.reason, "stage": plan.stages[stage].name, "virtual_s": last.at - T0}
    return rep


def offline(args: argparse.Namespace, workdir: Path) -> list[Report]:
    plan = load_plan(SIM_PLAN)
    reps = [scenario_broken(workdir, plan), scenario_better(workdir, plan, bundles=tiny_bundles(workdir)),
            scenario_kill(workdir, plan),
            scenario_srm(workdir, plan), scenario_equal(workdir, plan, args.aa_runs)]  # fmt: skip
    return reps


def print_summary(reports: list[Report]) -> bool:
    for r in reports:
        for name, ok in r.checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {r.scenario:<8} {name}")
        print(f"           {r.scenario:<8} measured: {json.dumps(r.measured, default=str)}")
    ok = all(r.ok for r in reports)
    print(f"  => {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["offline", "live"])
    p.add_argument("--quick", action="store_true", help="fewer A/A replays (smoke)")
    p.add_argument("--aa-runs", type=int, default=None, help="A/A replays (default 40, --quick 4)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.aa_runs = args.aa_runs or (4 if args.quick else 40)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        if args.mode == "offline":
            reports = offline(args, Path(tmp))
        else:
            from rollout_live import live_scenarios  # noqa: PLC0415 (starts Ray)

            reports = live_scenarios(args, Path(tmp))
    ok = print_summary(reports)
    out = {
        "command": " ".join(["python", "bench/rollout_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "pass": ok,
        "scenarios": {r.scenario: {"checks": r.checks, "measured": r.measured} for r in reports},
    }
    suffix = "-quick" if args.quick else ""
    path = args.json or REPO / "bench" / "results" / f"rollout-{args.mode}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path} ({out['wall_s']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
