"""The live rollout scenarios of bench/rollout_bench.py: a Serve app deployed through the config path (the
dashboard's REST API, as `serve deploy`), the controller as its detached Ray actor acting through the same
API, closed-loop HTTP load checking every response against the rerank contract.

- live-broken: the treatment's Scorer raises on every call (ScorerConfig.fault, from the start: shadow
  scoring fails in the background, unseen). The plan enters a 20% A/B stage; checks: a guardrail rolls
  back, the deployed config (REST) and the Router (/v1/model) say rollout 0, zero failed requests;
  measured: seconds from the first treatment answer (a fallback) to the last one, and from the advance
  decision to the rollback decision.
- live-kill: a healthy treatment ramps shadow -> 10% -> 30%; at 30% the actor's process is killed (Ray
  restarts it). Checks: it resumes at the same stage and entered_at, decisions 1..n without duplicate;
  then the admin API: no token 401, a wrong token 403, the operator's token 202 and the pause applied at
  the next tick; GET /v1/experiments lists the stage; abort from the CLI puts the config back to 0.

`LiveApp` holds what a scenario needs (dashboard URL, HTTP URL, app name and prefix), so that
tests/test_rollout_app.py runs the same scenarios on the test session's Serve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kit.bodies import synthetic_bodies
from kit.cluster import app_config, free_port, wait_app, wait_for
from kit.contract import LoadGen
from rollout_bench import Report

from cotrr_ray.experiments.controller import ServeRestActuator, Store
from cotrr_ray.serving.rollout import ADMIN_TOKEN_ENV

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LiveApp:
    dashboard: str
    http_url: str  # the Serve HTTP root, no prefix
    http_port: int
    bundle: Path
    control: Path
    workdir: Path
    name: str = "rollout"
    prefix: str = "/rollout"
    token: str = "bench-admin-token"
    metrics_url: str | None = None  # Ray's Prometheus endpoint: the controller's series are checked there

    @property
    def url(self) -> str:
        return self.http_url + self.prefix

    def rest(self) -> ServeRestActuator:
        from cotrr_ray.serving.rollout_actor import _ray_auth_headers

        return ServeRestActuator(self.dashboard, self.name, headers=_ray_auth_headers())


def live_plan(stages: list[dict[str, Any]], *, from_stage: str, min_queries: int = 20) -> dict[str, Any]:
    return {
        "name": "live", "stages": stages, "max_duration_s": 900,
        # No click feedback in this load: the metric harm tests have no variance, so none is configured
        # (they are exercised offline, with simulated clicks); the rate and latency guardrails are live.
        "guardrails": {"min_queries": min_queries, "max_fallback_rate": 0.05, "max_error_rate": 0.01,
                       "max_latency_p99_ms": 2000, "metrics": []},
        "success": {"from_stage": from_stage}, "srm_min_units": 100000,
    }  # fmt: skip


def deploy(app: LiveApp, salt: str, events: Path, *, fault: str | None) -> float:
    """The app (Router, Scorer = treatment, ScorerControl, Calibrator) through the REST API; seconds until
    it is healthy and, with `fault`, the treatment's Scorer then switched to it (/healthz runs a real
    inference through every scorer, so a broken one keeps it at 503: the app comes up healthy first)."""
    from cotrr_ray.bundles.bundle import read_meta

    cfg = app_config(
        http_port=app.http_port, bundle=str(app.bundle), control_bundle=str(app.control), name=app.name,
        route_prefix=app.prefix, top_m=read_meta(app.bundle).top_m,
        fixed_replicas={"Router": 1, "Scorer": 1, "Calibrator": 1},
        deployment_overrides={d: {"ray_actor_options": {"num_cpus": 0.25}}
                              for d in ("Router", "Scorer", "ScorerControl", "Calibrator")},
    )  # fmt: skip
    spec = cfg["applications"][0]
    spec["args"]["event_log"] = {"uri": str(events), "max_segment_age_s": 5}
    spec.setdefault("runtime_env", {}).setdefault("env_vars", {})[ADMIN_TOKEN_ENV] = app.token
    scorer = next(d for d in spec["deployments"] if d["name"] == "Scorer")
    for d in spec["deployments"]:
        if d["name"] == "Router":
            d["user_config"].update(experiment_salt=salt, rollout_percentage=0.0, shadow_mode=False, mode="ab")
    scorer["user_config"]["fault"] = "none"
    t0 = time.monotonic()
    app.rest().deploy_app(spec)
    wait_app(app.name, app.url, timeout_s=240)
    wait_for(lambda: _model(app, "routing", "experiment_salt") == salt, 240, 0.5, f"the Router on salt {salt}")
    if fault is not None:
        scorer["user_config"]["fault"] = fault
        app.rest().deploy_app(spec)
        wait_for(lambda: _model(app, "scorer", "config", "fault") == fault, 120, 0.5, f"the Scorer fault {fault}")
    return time.monotonic() - t0


def _model(app: LiveApp, *keys: str) -> Any:
    try:
        out = httpx.get(app.url + "/v1/model", timeout=10).json()
        for k in keys:
            out = out[k]
        return out
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def start_controller(app: LiveApp, salt: str, events: Path, plan: dict[str, Any], interval_s: float = 1.0):
    from cotrr_ray.serving import rollout_actor as RA

    settings = {"plan": plan, "log": str(events), "experiment": salt, "dashboard": app.dashboard,
                "app": app.name, "registry": None, "model": None, "interval_s": interval_s}  # fmt: skip
    return RA.start(settings)


def _status(handle, timeout_s: float = 30.0) -> dict[str, Any]:
    import ray

    return ray.get(handle.status.remote(), timeout=timeout_s)


def _load(app: LiveApp, n_units: int = 300) -> LoadGen:
    from cotrr_ray.bundles.bundle import read_meta

    bodies = synthetic_bodies(n_bodies=n_units, n_candidates=30, top_m=read_meta(app.bundle).top_m, seed=31,
                              query_prefix="ro-q", unit_prefix="ro-u")  # fmt: skip
    return LoadGen(app.http_url, bodies, concurrency=3, path=app.prefix + "/v1/rerank")


def scenario_live_broken(app: LiveApp) -> Report:
    from cotrr_ray.serving import rollout_actor as RA

    rep = Report("live-broken")
    salt, events = f"live-broken-{uuid.uuid4().hex[:6]}", app.workdir / "events-broken"
    rep.measured["deploy_s"] = round(deploy(app, salt, events, fault="raise"), 1)
    stages = [
        {"name": "shadow", "mode": "shadow", "rollout_percentage": 0, "min_duration_s": 3, "min_units": 1},
        {"name": "20%", "mode": "ab", "rollout_percentage": 20, "min_duration_s": 600, "min_units": 100000},
    ]
    gen = _load(app).start()
    wall0 = time.time()
    handle = start_controller(app, salt, events, live_plan(stages, from_stage="20%"))
    try:
        doc = wait_for(lambda: (d := _status(handle))["state"] != "running" and d, 180, 0.5, "a rollback")
        time.sleep(3)  # requests after the rollback: all on control
    finally:
        records = gen.stop()
        RA.stop(salt)
    _check_broken(rep, app, doc, records, wall0)
    return rep


def _check_broken(rep: Report, app: LiveApp, doc: dict[str, Any], records, wall0: float) -> None:
    last = doc["decisions"][-1]
    rep.check("a guardrail rolled the treatment back", doc["state"] == "rolled_back" and "guardrail" in last["reason"])
    failed = [r for r in records if r.status != 200 or r.problem]
    rep.check(f"0 failed requests of {len(records)}", not failed)
    deployed = app.rest().routing()
    served = httpx.get(app.url + "/v1/model", timeout=10).json()["routing"]
    rep.check("the deployed config and the Router both say rollout 0",
              deployed["rollout_percentage"] == 0 and served["rollout_percentage"] == 0)  # fmt: skip
    treated = [r for r in records if r.arm == "treatment"]
    advance = next(d for d in doc["decisions"] if d["action"] == "advance")
    span = (max(r.t + r.latency_ms / 1000 for r in treated) - min(r.t for r in treated)) if treated else None
    rep.measured.update({
        "requests": len(records), "failed": len(failed), "treatment_answers": len(treated),
        "treatment_fallbacks": sum(1 for r in treated if r.fallback),
        "s_first_to_last_treatment_answer": None if span is None else round(span, 2),
        "s_advance_to_rollback_decision": round(last["at"] - advance["at"], 2),
        "s_start_to_rollback": round(last["at"] - wall0, 1),
        "rollback_reason": last["reason"],
    })  # fmt: skip
    rep.check("every treatment answer was a fallback (0 failed, answered in upstream order)",
              all(r.fallback for r in treated))  # fmt: skip
    rep.check("traffic back on control within 30 s of the first treatment answer", span is not None and span <= 30)


def scenario_live_kill(app: LiveApp) -> Report:
    import ray

    from cotrr_ray.serving import rollout_actor as RA

    rep = Report("live-kill")
    salt, events = f"live-kill-{uuid.uuid4().hex[:6]}", app.workdir / "events-kill"
    rep.measured["deploy_s"] = round(deploy(app, salt, events, fault=None), 1)
    stages = [
        {"name": "shadow", "mode": "shadow", "rollout_percentage": 0, "min_duration_s": 2, "min_units": 1},
        {"name": "10%", "mode": "ab", "rollout_percentage": 10, "min_duration_s": 3, "min_units": 1},
        {"name": "30%", "mode": "ab", "rollout_percentage": 30, "min_duration_s": 600, "min_units": 100000},
    ]
    gen = _load(app).start()
    handle = start_controller(app, salt, events, live_plan(stages, from_stage="30%", min_queries=5))
    try:
        before = wait_for(lambda: (d := _status(handle))["stage"]["index"] == 2 and d, 180, 0.5, "stage 30%")
        pid = ray.get(handle.pid.remote())
        t_kill = time.time()
        ray.kill(handle, no_restart=False)  # the process dies; Ray starts the actor again
        after = wait_for(lambda: _restarted(handle, before), 120, 0.5, "the restarted controller")
        rep.measured["s_kill_to_resumed"] = round(time.time() - t_kill, 1)
        rep.check("the restarted actor is a new process", ray.get(handle.pid.remote()) != pid)
        rep.check("it resumed at the same stage and entered_at",
                  after["stage"] == before["stage"] and after["state"] == "running")  # fmt: skip
        _admin_checks(rep, app, salt, events, handle)
    finally:
        records = gen.stop()
        RA.stop(salt)
    seqs = [r["seq"] for r in Store(str(events), salt).records()]
    rep.check("decision seqs 1..n: no duplicate, no gap", seqs == list(range(1, len(seqs) + 1)))
    rep.check(f"0 failed requests of {len(records)}", not [r for r in records if r.status != 200 or r.problem])
    rep.measured["decisions"] = [(r["seq"], r["action"], r["actor"]) for r in Store(str(events), salt).records()]
    return rep


def _restarted(handle, before: dict[str, Any]) -> dict[str, Any] | None:
    try:
        doc = _status(handle, timeout_s=5)
    except Exception:  # still restarting
        return None
    return doc if doc["actor_started_at"] != before["actor_started_at"] else None


def _admin_checks(rep: Report, app: LiveApp, salt: str, events: Path, handle) -> None:
    url = f"{app.url}/admin/experiments/{salt}/pause"
    body = {"operator": "bench", "reason": "admin API check"}
    codes = [
        httpx.post(url, json=body, timeout=10).status_code,
        httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code,
        httpx.post(url, json=body, headers={"Authorization": f"Bearer {app.token}"}, timeout=10).status_code,
    ]
    rep.measured["admin_status_codes"] = codes
    rep.check("rerank clients without the admin token are refused (401, 403); the operator is not (202)",
              codes == [401, 403, 202])  # fmt: skip
    paused = wait_for(lambda: (d := _status(handle))["state"] == "paused" and d, 30, 0.5, "the pause")
    rep.check("the operator's pause was applied by the controller",
              paused["decisions"][-1]["actor"] == "operator:bench")  # fmt: skip
    listed = httpx.get(app.url + "/v1/experiments", timeout=10).json()["experiments"]
    mine = next((e for e in listed if e["experiment_id"] == salt), None)
    rep.check(
        "GET /v1/experiments lists the experiment at its stage", mine is not None and mine["stage"]["name"] == "30%"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "cotrr_ray.experiments", "abort", "--log", str(events), "--experiment", salt,
           "--operator", "bench", "--reason", "end of the check"]  # fmt: skip
    subprocess.run(cli, check=True, env=env, capture_output=True, timeout=60)
    wait_for(lambda: _status(handle)["state"] == "aborted", 30, 0.5, "the abort")
    rep.check("abort from the CLI: the deployed config is back to rollout 0",
              wait_for(lambda: app.rest().routing()["rollout_percentage"] == 0, 30, 0.5, "rollout 0"))  # fmt: skip
    if app.metrics_url:
        series = "ray_cotrr_rollout_decisions{action=pause}"

        def exported() -> bool:
            text = httpx.get(app.metrics_url, timeout=10).text
            return any(line.startswith("ray_cotrr_rollout_decisions") and salt in line and "pause" in line
                       for line in text.splitlines())  # fmt: skip

        try:
            ok = bool(wait_for(exported, 60, 1.0, series))
        except TimeoutError:
            ok = False
        rep.check("the decisions are Prometheus series (ray_cotrr_rollout_decisions)", ok)


def live_scenarios(args, workdir: Path) -> list[Report]:
    """A fresh local Ray (ours alone) with the dashboard on; both scenarios on it."""
    import ray
    from kit.bundles import prepare_bundle
    from ray import serve

    from cotrr_ray.config import FAULT_INJECTION_ENV

    os.environ[FAULT_INJECTION_ENV] = "1"
    http_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash_port,
             _metrics_export_port=metrics_port, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", FAULT_INJECTION_ENV: "1"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        bundle = prepare_bundle(getattr(args, "bundle", None), workdir)
        control = workdir / "control"
        shutil.copytree(bundle, control)
        app = LiveApp(f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{http_port}", http_port, bundle, control,
                      workdir, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")  # fmt: skip
        return [scenario_live_broken(app), scenario_live_kill(app)]
    finally:
        ray.shutdown()
