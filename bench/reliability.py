#!/usr/bin/env python
"""Reliability checks of the Serve application on a fresh local Ray: autoscaling, faults, load, alias moves.

    python bench/reliability.py autoscale|faults|load|alias|all [--quick] [--json OUT] [--bundle DIR]

Each scenario deploys a copy of serve_config.yaml through Serve's config path (what `serve deploy`
does: `serve_start(http_options)` + `deploy_apps(config)`) on its own `ray.init(address="local")`
(never someone else's cluster; HTTP on 127.0.0.1 and a free port), drives it with a closed-loop
asyncio + httpx client in this process, checks every response against the HTTP contract, and prints
a pass/fail summary (exit status 1 on any failed check). Every run records /proc/loadavg before and
after: the box is shared, and latency numbers mean little without it.

- autoscale: serve_config.yaml with short delays (upscale 2 s, downscale 10 s, look-back 11 s) and
  small CPU reservations so that Scorer (max 3) and Calibrator (max 2) replicas fit on 2 CPUs;
  a load ramp (concurrency 2 -> 8 -> 32 -> 0; the last step lasts until both are at max, 60 s or
  90 s at most); replica counts from `serve.status()` every second and latency per 5 s window.
  Checks: both reach max_replicas under load, both return to min_replicas after the load stops
  within look-back + downscale delay + a 30 s margin, zero failed requests.
- faults: one app with a control bundle (ScorerControl) and two Scorer replicas; under sustained
  load: (1) `ray.kill` of one Scorer replica actor, (2) of every Scorer replica, (3) of the
  Calibrator replica, (4) shadow treatment slow, then failing, (5) hot swaps to a corrupt, an
  incomplete and a wrong-spec bundle, (6) a Scorer replica killed while a refused bundle_uri is
  still configured (reported: the replacement cannot start until the config is reverted).
  Checks: zero non-200 responses, affected requests answered in upstream order with `fallback`
  set (scorer) or ordered by the scorer with `calibrated: false` (calibrator), Serve replaces the
  killed replicas, control latency unchanged by a slow shadow, a failing shadow paused and costing
  control no more than a slow one (p50 within 15 %, requests served within 15 %), the refused
  bundles are reported and the previous bundle keeps serving.
- alias: a registry on a loopback S3 server (its address in the environment before Ray starts, so the
  replicas read only from the object store); the bundle published there and `production` set; the app
  serves `s3://.../demo@production` with Scorer replicas polling the alias every 2 s: one at deploy, a
  second added once it runs, so that the two poll at different phases as replicas added by autoscaling
  do; after 50 warm-up requests, under load (concurrency 4, 8 without --quick), the real train_job.py
  (shrunk to seconds) publishes a new bundle into the same registry as `candidate`, then production is
  promoted to it and rolled back. Each replica's bundle id is sampled through the Scorer handle's
  `info` every 0.25 s. Checks: zero failed requests and fallbacks, every response from the old or the
  new id and calibrated, every replica on the moved-to id within alias_poll_s + a 5 s load allowance;
  reported: convergence times, the version-skew window (first new-id response to the last old-id one)
  and the training wall time.
- load: serve_config.yaml as shipped (host/port/bundle only), 10,000 requests at concurrency 32
  (`--quick`: 1,000): zero errors, p50/p95/p99, throughput, fallbacks.

Request bodies: 32 synthetic queries (fixed seed, queries the model never saw), 40 candidates each,
the first top_m with base64 features. The bundle (default artifacts/registry/demo@production, copied to a temp
dir first so a concurrent retrain cannot change it mid-run) is built tiny on the fly if missing.

tests/test_reliability.py imports this module (LoadGen, check_response, app_config, replica helpers,
tamper, scenario_autoscale) and runs reduced versions against the test session's Serve.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

from kit.bodies import Body, synthetic_bodies  # noqa: E402
from kit.bundles import prepare_bundle  # noqa: E402
from kit.cluster import (  # noqa: E402
    APP,
    Cluster,
    ReplicaSampler,
    app_config,
    app_status,
    deploy,
    httpx_get,
    replica_states,
    running,
    set_user_config,
    wait_app,
    wait_config,
    wait_for,
)
from kit.contract import LoadGen  # noqa: E402
from kit.faults import kill_under_load, tamper  # noqa: E402
from kit.load import Rec, RecordingLoadGen, summarize  # noqa: E402
from kit.machine import basic_machine, loadavg, say  # noqa: E402
from kit.report import Report, load_windows, print_windows, write_json  # noqa: E402

# ============================================================================ request bodies


def make_bodies(top_m: int, *, n_bodies: int = 32, n_candidates: int = 40, seed: int = 20_000) -> list[Body]:
    """Synthetic rerank requests (labels removed): the first top_m candidates carry base64 features."""
    return synthetic_bodies(n_bodies=n_bodies, n_candidates=n_candidates, top_m=top_m, seed=seed, query_prefix="rel-q")


# ============================================================================ response contract


# ============================================================================ load generator


# ============================================================================ autoscale


AUTOSCALE = {
    # Short delays so a run takes about two minutes; serve_config.yaml ships 10 s / 300 s / 30 s
    # (scale up only on sustained load, keep replicas through short lulls: a Scorer replica costs a
    # torch import + bundle load + warm-up, seconds of CPU, so flapping costs more than idling).
    # Targets are small because on 2 cores the Router (JSON parse, Serve hops), not the model, is
    # the bottleneck: the ongoing requests a 2-core box can put on a Scorer are a handful at most.
    "Scorer": {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 0.5,
        "upscale_delay_s": 2,
        "downscale_delay_s": 10,
        "look_back_period_s": 11,
    },
    "Calibrator": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 0.2,
        "upscale_delay_s": 2,
        "downscale_delay_s": 10,
        "look_back_period_s": 11,
    },
}
AUTOSCALE_CPUS = {"Router": 0.25, "Scorer": 0.25, "Calibrator": 0.1}  # max set = 0.25 + 3*0.25 + 2*0.1 = 1.2


def autoscale_config(http_port: int, bundle: str, top_m: int, *, name: str = APP, route_prefix: str = "/") -> dict:
    return app_config(
        http_port=http_port,
        bundle=bundle,
        name=name,
        route_prefix=route_prefix,
        top_m=top_m,
        fixed_replicas={"Router": 1},
        deployment_overrides={
            "Router": {"ray_actor_options": {"num_cpus": AUTOSCALE_CPUS["Router"]}},
            "Scorer": {
                "autoscaling_config": AUTOSCALE["Scorer"],
                "ray_actor_options": {"num_cpus": AUTOSCALE_CPUS["Scorer"]},
            },
            "Calibrator": {
                "autoscaling_config": AUTOSCALE["Calibrator"],
                "ray_actor_options": {"num_cpus": AUTOSCALE_CPUS["Calibrator"]},
            },
        },
    )


def scenario_autoscale(url: str, app: str, bodies: list[Body], *, quick: bool) -> Report:
    """Ramp the load, sample replica counts every second, then stop and watch them come back down.
    The app must already run with `autoscale_config` at `url` (route prefix included)."""
    rep = Report("autoscale")
    # The last step lasts at least `hold_s` and until both deployments reach max_replicas (at most `cap_s`).
    ramp = [(2, 8), (8, 8), (32, 20 if quick else 40)]
    cap_s = 60 if quick else 90
    down_budget_s = AUTOSCALE["Scorer"]["look_back_period_s"] + AUTOSCALE["Scorer"]["downscale_delay_s"] + 30
    gen = LoadGen(url, bodies, concurrency=0, max_concurrency=max(c for c, _ in ramp))
    sampler = ReplicaSampler(app, gen)
    gen.start()
    sampler.start()
    phases = drive_ramp(gen, app, ramp, cap_s)
    t_stop = gen.now()
    gen.set_concurrency(0)
    gen.stop()
    say(f"  load stopped at t={t_stop:.0f} s; waiting up to {down_budget_s} s for scale-down")
    wait_scale_down(app, down_budget_s + 30)
    time.sleep(1.5)
    timeline = sampler.stop()
    windows = load_windows(gen.records, timeline, t_stop)
    total = summarize(gen.records)
    rep.data.update(
        config=AUTOSCALE,
        cpus=AUTOSCALE_CPUS,
        phases=phases,
        load_stopped_at_s=round(t_stop, 1),
        timeline=timeline,
        windows=windows,
        total=total,
        times_s=scaling_times(timeline, t_stop),
    )
    print_windows(windows)
    check_autoscale(rep, t_stop, down_budget_s)
    return rep


def drive_ramp(gen: RecordingLoadGen, app: str, ramp: list[tuple[int, int]], cap_s: float) -> list[dict[str, Any]]:
    """Each (concurrency, seconds) step in turn; the last one also until both deployments are at max
    (`cap_s` at most), then a few seconds at full size."""
    phases = []
    smax, cmax = AUTOSCALE["Scorer"]["max_replicas"], AUTOSCALE["Calibrator"]["max_replicas"]
    for k, (c, seconds) in enumerate(ramp):
        gen.set_concurrency(c)
        t = gen.now()
        last = k == len(ramp) - 1
        say(
            f"  load: concurrency {c} for {seconds} s"
            + (f" and until both are at max (at most {cap_s} s)" if last else "")
        )
        time.sleep(seconds)
        while (
            last
            and gen.now() - t < cap_s
            and not (running(app, "Scorer") >= smax and running(app, "Calibrator") >= cmax)
        ):
            time.sleep(1.0)
        if last:
            time.sleep(3.0)  # a few seconds at full size
        phases.append({"concurrency": c, "from_s": round(t, 1), "to_s": round(gen.now(), 1)})
    return phases


def wait_scale_down(app: str, timeout_s: float) -> None:
    def at_min() -> bool:  # only min_replicas left, nothing STARTING or STOPPING
        states = replica_states(app)
        return all(states.get(d, {}) == {"RUNNING": AUTOSCALE[d]["min_replicas"]} for d in ("Scorer", "Calibrator"))

    with contextlib.suppress(TimeoutError):
        wait_for(at_min, timeout_s, 1.0, "scale-down")


def scaling_times(timeline: list[dict[str, Any]], t_stop: float) -> dict[str, float | None]:
    """When each deployment first reached max_replicas, and first was back to one replica after the load."""

    def first(pred, after: float = 0.0) -> float | None:
        return next((s["t"] for s in timeline if s["t"] >= after and pred(s)), None)

    def n_run(s: dict, dep: str) -> int:
        return s[dep].get("RUNNING", 0)

    def down(dep: str) -> float | None:
        return first(lambda s: n_run(s, dep) == 1 and sum(s[dep].values()) == 1, after=t_stop)

    return {
        "scorer_at_max": first(lambda s: n_run(s, "Scorer") >= AUTOSCALE["Scorer"]["max_replicas"]),
        "calibrator_at_max": first(lambda s: n_run(s, "Calibrator") >= AUTOSCALE["Calibrator"]["max_replicas"]),
        "scorer_back_to_min": down("Scorer"),
        "calibrator_back_to_min": down("Calibrator"),
    }


def check_autoscale(rep: Report, t_stop: float, down_budget_s: float) -> None:
    times, total = rep.data["times_s"], rep.data["total"]
    smax, cmax = AUTOSCALE["Scorer"]["max_replicas"], AUTOSCALE["Calibrator"]["max_replicas"]
    rep.check(
        "Scorer scales up to max_replicas under load",
        times["scorer_at_max"] is not None,
        f"{smax} RUNNING at t={times['scorer_at_max']} s",
    )
    rep.check(
        "Calibrator scales up to max_replicas under load",
        times["calibrator_at_max"] is not None,
        f"{cmax} RUNNING at t={times['calibrator_at_max']} s",
    )
    for dep, t_down in (("Scorer", times["scorer_back_to_min"]), ("Calibrator", times["calibrator_back_to_min"])):
        took = None if t_down is None else round(t_down - t_stop, 1)
        rep.check(
            f"{dep} back to min_replicas after the load stops",
            took is not None and took <= down_budget_s,
            f"{took} s after the load stopped (look-back {AUTOSCALE[dep]['look_back_period_s']} s + downscale "
            f"delay {AUTOSCALE[dep]['downscale_delay_s']} s + 30 s margin = {down_budget_s} s)",
        )
    rep.check(
        "zero failed requests while scaling",
        total["failed"] == 0 and total["contract_violations"] == 0,
        f"{total['requests']} requests, status {total['status']}, fallbacks {total['fallbacks']}",
    )


# ============================================================================ faults


@dataclass
class Faults:
    """What the fault phases share: the app's URL and config, request bodies, the bundle and the report."""

    url: str
    cfg: dict[str, Any]
    bodies: list[Body]
    bundle: Path
    workdir: Path
    bundle_id: str
    quick: bool
    rep: Report


def scenario_faults(cluster_url: str, bundle: Path, workdir: Path, *, quick: bool, http_port: int) -> Report:
    """The recipe: deploy the faults app, then each fault under load, in order."""
    f = deploy_faults_app(cluster_url, bundle, workdir, quick=quick, http_port=http_port)
    fault_kills(f)
    fault_shadow(f)
    fault_bad_bundles(f)
    fault_kill_with_refused_bundle(f)
    return f.rep


def deploy_faults_app(cluster_url: str, bundle: Path, workdir: Path, *, quick: bool, http_port: int) -> Faults:
    """One app with a control bundle (ScorerControl), two Scorer replicas, everything at 0.25 CPU."""
    from cotrr_ray.bundles.bundle import read_meta

    rep = Report("faults")
    meta = read_meta(bundle)
    control = workdir / "control"
    shutil.copytree(bundle, control)
    cfg = app_config(
        http_port=http_port,
        bundle=str(bundle),
        control_bundle=str(control),
        top_m=meta.top_m,
        fixed_replicas={"Router": 1, "Scorer": 2, "Calibrator": 1},
        deployment_overrides={
            d: {"ray_actor_options": {"num_cpus": 0.25}} for d in ("Router", "Scorer", "ScorerControl", "Calibrator")
        },
    )
    cfg = set_user_config(cfg, "Router", rollout_percentage=100)
    deploy(cfg)
    rep.data["deploy_s"] = round(wait_app(APP, cluster_url), 1)
    return Faults(cluster_url, cfg, make_bodies(meta.top_m), bundle, workdir, meta.bundle_id, quick, rep)


def fault_kills(f: Faults) -> None:
    """Faults 1-3: one Scorer replica, every Scorer replica, the Calibrator replica killed under load."""
    for n, what, key, deployment, kill_all, concurrency, timeout_s in (
        (1, "one Scorer replica", "scorer_kill_one", "Scorer", False, 8, 90),
        (2, "every Scorer replica", "scorer_kill_all", "Scorer", True, 8, 120),
        (3, "the Calibrator replica", "calibrator_kill", "Calibrator", True, 4, 90),
    ):
        say(f"fault {n}: kill {what} under load")
        r = f.rep.data[key] = kill_under_load(
            f.url, APP, f.bodies, deployment, kill_all=kill_all, concurrency=concurrency, replace_timeout_s=timeout_s
        )
        check_kill(f.rep, key, r)


KILL_CHECKS = {  # data key -> (label, the check of the answers while it is down, what Serve replaced)
    "scorer_kill_one": (
        "scorer kill",
        "every response well-formed (fallbacks in upstream order)",
        "the replica",
    ),
    "scorer_kill_all": ("all scorers killed", "outage answered in upstream order with fallback set", "both"),
    "calibrator_kill": ("calibrator kill", "still ordered by the scorer, calibrated false while it is down", "it"),
}


def check_kill(rep: Report, key: str, r: dict[str, Any]) -> None:
    """Zero failed requests, the answers while it was down, and Serve replacing what was killed."""
    label, answers, replaced = KILL_CHECKS[key]
    t, d = r["total"], r["during_outage"]
    rep.check(f"{label}: zero failed requests", t["failed"] == 0, f"{t['requests']} requests, status {t['status']}")
    if key == "scorer_kill_one":
        ok, detail = t["contract_violations"] == 0, f"fallbacks {t['fallbacks']}"
    elif key == "scorer_kill_all":
        ok = t["contract_violations"] == 0 and sum(d["fallbacks"].values()) > 0
        detail = f"during the outage {d['requests']} requests, fallbacks {d['fallbacks']}"
    else:
        ok = t["contract_violations"] == 0 and t["uncalibrated"] > 0
        detail = f"{t['uncalibrated']} uncalibrated (model-ordered) answers, fallbacks {t['fallbacks']}"
    rep.check(f"{label}: {answers}", ok, detail)
    after = f"after {r['replaced_after_s']} s" + (f": {r['new_replicas']}" if key == "scorer_kill_one" else "")
    rep.check(f"{label}: Serve replaced {replaced}", r["replaced_after_s"] is not None, after)


def shadow_phase(f: Faults, shadow_cfg: dict[str, Any], phase: str, fault: dict[str, Any]) -> dict[str, Any]:
    """The shadow treatment's Scorer set to `fault`; load on the control for a few seconds."""
    deploy(set_user_config(shadow_cfg, "Scorer", **fault))
    wait_config(f.url, routing={"shadow_mode": True}, scorer=fault)
    time.sleep(1.0)
    before = orjson.loads(httpx_get(f.url + "/v1/stats"))["shadow"]
    gen = LoadGen(f.url, f.bodies, concurrency=4).start()
    time.sleep(6 if f.quick else 12)
    s = summarize(gen.stop())
    after = orjson.loads(httpx_get(f.url + "/v1/stats"))["shadow"]
    shadow = {k: after[k] - before[k] for k in ("comparisons", "errors", "timeouts", "dropped", "paused")}
    say(
        f"  {phase}: p50 {s['latency_ms']['p50']} ms p99 {s['latency_ms']['p99']} ms, {s['requests']} requests, "
        f"status {s['status']}, shadow {shadow}"
    )
    return {
        **s,
        "shadow": shadow,
        "arms": dict(Counter(rec.arm for rec in gen.records)),
        "control_versions": sorted({rec.model_version for rec in gen.records if rec.model_version}),
    }


def fault_shadow(f: Faults) -> None:
    say("fault 4: shadow treatment slow, then failing; control answers")
    shadow_cfg = set_user_config(f.cfg, "Router", shadow_mode=True, shadow_timeout_ms=300)
    phases = {
        phase: shadow_phase(f, shadow_cfg, phase, fault)
        for phase, fault in (
            ("healthy", {"fault": "none"}),
            ("slow", {"fault": "slow", "fault_delay_s": 2.0}),
            ("failing", {"fault": "raise"}),
        )
    }
    deploy(set_user_config(f.cfg, "Scorer", fault="none"))
    wait_config(f.url, routing={"shadow_mode": False}, scorer={"fault": "none"})
    f.rep.data["shadow"] = phases
    for phase in ("slow", "failing"):
        p = phases[phase]
        f.rep.check(
            f"shadow {phase}: control responses all 200, ordered, arm=control",
            p["failed"] == 0 and p["contract_violations"] == 0 and set(p["arms"]) == {"control"} and not p["fallbacks"],
            f"{p['requests']} requests, arms {p['arms']}",
        )
    check_shadow_costs(f.rep, phases)
    slow, failing = phases["slow"]["shadow"], phases["failing"]["shadow"]
    f.rep.check(
        "shadow slow: treatment timeouts/drops counted",
        slow["timeouts"] + slow["dropped"] + slow["errors"] > 0,
        str(slow),
    )
    f.rep.check(
        "shadow failing: treatment errors counted, then the shadow paused",
        failing["errors"] > 0 and failing["paused"] > 0,
        str(failing),
    )


def check_shadow_costs(rep: Report, phases: dict[str, dict[str, Any]]) -> None:
    """A slow shadow costs control little (its windows wait on the router and time out unsent), so it
    is the bound for a failing one: same p50 within 15 %, same number served within 15 % in equal
    windows. (A failing shadow once cost control a fifth of its throughput: every request shipped
    its window to a scorer that raised, and the raise was the expensive way back.)"""
    healthy, slow, failing = (phases[p] for p in ("healthy", "slow", "failing"))
    base = healthy["latency_ms"]
    bound = max(1.5 * base["p50"], base["p50"] + 25)
    rep.check(
        "shadow slow: control latency unaffected",
        slow["latency_ms"]["p50"] <= bound,
        f"p50 {slow['latency_ms']['p50']} ms vs healthy {base['p50']} ms (bound {bound:.0f}); "
        f"p99 {slow['latency_ms']['p99']} vs {base['p99']} ms",
    )
    p50_bound = 1.15 * slow["latency_ms"]["p50"]
    rep.check(
        "shadow failing: control costs no more than with a slow shadow",
        failing["latency_ms"]["p50"] <= p50_bound and failing["requests"] >= 0.85 * slow["requests"],
        f"p50 {failing['latency_ms']['p50']} ms vs slow {slow['latency_ms']['p50']} ms (bound {p50_bound:.0f}); "
        f"served {failing['requests']} vs slow {slow['requests']} (bound {0.85 * slow['requests']:.0f}); "
        f"healthy p50 {base['p50']} ms, {healthy['requests']} served",
    )


def fault_bad_bundles(f: Faults) -> None:
    say("fault 5: hot swap to bad bundles under load")
    gen = LoadGen(f.url, f.bodies, concurrency=4).start()
    swaps = {}
    for kind in ("corrupt", "missing", "spec"):
        bad = tamper(f.bundle, f.workdir / f"bad-{kind}", kind)
        deploy(set_user_config(f.cfg, "Scorer", bundle_uri=str(bad)))
        try:
            model = wait_config(f.url, scorer={"bundle_uri": str(bad)})
            err = (model.get("scorer") or {}).get("last_swap_error") or ""
            swaps[kind] = {"model_version": model.get("model_version"), "last_swap_error": err}
        except TimeoutError as e:
            swaps[kind] = {"error": str(e)}
        say(f"  {kind}: {swaps[kind]}")
    deploy(set_user_config(f.cfg, "Scorer", bundle_uri=None))
    wait_config(f.url, scorer={"bundle_uri": None})
    time.sleep(1.0)
    s = summarize(gen.stop())
    versions = Counter(rec.model_version for rec in gen.records)
    f.rep.data["hot_swap"] = {"swaps": swaps, "load": s, "model_versions": dict(versions)}
    for kind, expect in (("corrupt", "checksum mismatch"), ("missing", "missing file"), ("spec", "not the served one")):
        err = swaps[kind].get("last_swap_error", "")
        f.rep.check(f"hot swap {kind}: refused with a clear message", expect in err, err[:160])
    f.rep.check(
        "hot swap: previous bundle kept serving, zero failed requests",
        s["failed"] == 0 and s["contract_violations"] == 0 and set(versions) == {f.bundle_id} and not s["fallbacks"],
        f"{s['requests']} requests, versions {dict(versions)}, fallbacks {s['fallbacks']}",
    )


def fault_kill_with_refused_bundle(f: Faults) -> None:
    say("fault 6: a Scorer replica dies while a refused bundle is still configured")
    bad = f.workdir / "bad-corrupt"
    deploy(set_user_config(f.cfg, "Scorer", bundle_uri=str(bad)))
    wait_config(f.url, scorer={"bundle_uri": str(bad)})
    r = kill_under_load(
        f.url, APP, f.bodies, "Scorer", kill_all=False, concurrency=4, replace_timeout_s=20 if f.quick else 40
    )
    st = app_status(APP).deployments["Scorer"]
    r["scorer_status"], r["scorer_message"] = str(st.status), st.message.splitlines()[0][:200] if st.message else ""
    f.rep.data["kill_with_refused_bundle_configured"] = r
    t_revert = time.monotonic()
    deploy(set_user_config(f.cfg, "Scorer", bundle_uri=None))
    wait_config(f.url, scorer={"bundle_uri": None})
    try:
        wait_for(lambda: replica_states(APP).get("Scorer") == {"RUNNING": 2}, 90, 0.5, "2 Scorer replicas after revert")
        r["restored_after_revert_s"] = round(time.monotonic() - t_revert, 1)
    except TimeoutError:
        r["restored_after_revert_s"] = None
    t = r["total"]
    f.rep.check(
        "refused bundle configured + replica death: zero failed requests, the survivor serves",
        t["failed"] == 0 and t["contract_violations"] == 0,
        f"{t['requests']} requests, fallbacks {t['fallbacks']}",
    )
    f.rep.check(
        "refused bundle configured + replica death: full capacity back after reverting bundle_uri",
        r["restored_after_revert_s"] is not None,
        f"2 Scorer replicas RUNNING {r['restored_after_revert_s']} s after the revert",
    )
    f.rep.note(
        "refused bundle configured + replica death: replacement",
        f"replaced after {r['replaced_after_s']} s; Scorer {r['scorer_status']}: {r['scorer_message']} "
        "(a fresh replica refuses to start on a bundle it cannot load: revert bundle_uri after a refused swap)",
    )


# ============================================================================ load


def scenario_load(url: str, bundle: Path, *, n: int, concurrency: int, http_port: int) -> Report:
    from cotrr_ray.bundles.bundle import read_meta

    rep = Report("load")
    meta = read_meta(bundle)
    cfg = app_config(http_port=http_port, bundle=str(bundle), top_m=meta.top_m)
    cfg = set_user_config(cfg, "Router", rollout_percentage=100)
    deploy(cfg)
    rep.data["deploy_s"] = round(wait_app(APP, url), 1)
    bodies = make_bodies(meta.top_m)
    warm = LoadGen(url, bodies, concurrency=4, total=100).start()
    warm.join()
    rep.data["loadavg_at_start"] = loadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    say(f"  {n} requests at concurrency {concurrency} (loadavg {rep.data['loadavg_at_start']})")
    gen = LoadGen(url, bodies, concurrency=concurrency, total=n).start()
    gen.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    s = summarize(gen.records)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    wall = max(r.t + r.latency_ms / 1000 for r in gen.records)
    rep.data.update(
        requests=n,
        concurrency=concurrency,
        result=s,
        wall_s=round(wall, 1),
        client_cpu_cores=round(client_cpu / wall, 2),
        replica_states_after=replica_states(APP),
        body={"candidates": len(bodies[0].ids), "top_m": meta.top_m, "bytes": len(bodies[0].raw)},
    )
    say(
        f"  {s['requests']} requests in {wall:.1f} s ({s['throughput_rps']} req/s), p50 {s['latency_ms']['p50']} ms, "
        f"p95 {s['latency_ms']['p95']} ms, p99 {s['latency_ms']['p99']} ms, status {s['status']}, fallbacks {s['fallbacks']}"
    )
    rep.check(
        f"{n} requests at concurrency {concurrency}: zero errors",
        s["failed"] == 0 and s["requests"] == n,
        f"status {s['status']}",
    )
    rep.check("every response well-formed", s["contract_violations"] == 0, f"fallbacks {s['fallbacks']}")
    return rep


# ============================================================================ alias


ALIAS_POLL_S = 2.0  # ScorerConfig.alias_poll_s here (serve_config.yaml ships 10 s): a short run still sees a few polls
# What a replica may take past its poll interval before it serves the new id: the registry read (one LIST + GET
# on loopback S3), downloading and verifying the bundle into its cache, torch load and warm-up, all on 2 cores
# that the load, the Router and the training job's tail are also using. On the idle box that is well under a
# second for the tiny bundle; 5 s leaves room for the CPU contention, not for a missed poll.
ALIAS_LOAD_ALLOWANCE_S = 5.0
ALIAS_MODEL = "demo"


@dataclass
class AliasRun:
    """What the alias phases share: the app, the registry and its bundle ids, the load and the report."""

    url: str
    app: str
    registry: Any  # cotrr_ray.bundles.registry.Registry
    start_id: str
    top_m: int
    workdir: Path
    quick: bool
    rep: Report
    gen: RecordingLoadGen | None = None
    new_id: str | None = None


@contextlib.contextmanager
def object_store(needed: bool, workdir: Path):
    """The loopback S3 server for the alias scenario, yielding a registry root on it (None if not needed).

    Its endpoint and fake credentials go into os.environ before the caller starts Ray: every raylet,
    replica and the training subprocess inherit them, so s3:// means this server and nothing else. The
    bundle cache goes to `workdir`, so replicas download from the object store rather than reuse a copy
    another run left in ~/.cache."""
    if not needed:
        yield None
        return
    from kit.s3 import LoopbackS3

    from cotrr_ray.bundles.registry import CACHE_ENV

    saved = dict(os.environ)
    with LoopbackS3(log=workdir / "moto.log") as s3:
        os.environ.update({**s3.env, CACHE_ENV: str(workdir / "bundle-cache")})
        try:
            yield s3.create_bucket("cotrr-bench") + "/registry"
        finally:
            os.environ.clear()
            os.environ.update(saved)


def scenario_alias(
    url: str,
    http_port: int,
    registry_root: str,
    bundle: Path,
    workdir: Path,
    *,
    quick: bool,
    app: str = APP,
    route_prefix: str = "/",
    poll_s: float = ALIAS_POLL_S,
) -> Report:
    """The recipe: publish and serve @production, load, train a new bundle, promote it, roll back.
    `url` includes the route prefix; Serve must run with `registry_root`'s store in its environment."""
    a = publish_start_bundle(url, app, registry_root, bundle, workdir, quick=quick)
    cfg = deploy_alias_app(a, http_port, route_prefix, poll_s)
    scale_out(a, cfg)
    bodies, hold_s = make_bodies(a.top_m), 3.0 if quick else 10.0
    LoadGen(url, bodies, concurrency=4, total=50).start().join()  # warm-up, not recorded (as the load scenario)
    a.gen = LoadGen(url, bodies, concurrency=4 if quick else 8).start()
    time.sleep(hold_s)
    train_candidate(a)
    move_and_converge(a, "promote", a.new_id, poll_s)
    time.sleep(hold_s)
    move_and_converge(a, "rollback", a.start_id, poll_s)
    time.sleep(hold_s)
    records = a.gen.stop()
    check_alias(a, records, poll_s)
    return a.rep


def publish_start_bundle(url: str, app: str, root: str, bundle: Path, workdir: Path, *, quick: bool) -> AliasRun:
    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.bundles.registry import Registry

    meta = read_meta(bundle)
    registry = Registry(root)
    t0 = time.monotonic()
    uri = registry.publish(bundle, ALIAS_MODEL)
    registry.set_alias(ALIAS_MODEL, "production", meta.bundle_id, expected=None, reason="bench start")
    rep = Report("alias")
    rep.data.update(registry=root, start_bundle=uri, publish_s=round(time.monotonic() - t0, 2))
    say(f"  published {meta.bundle_id} -> {uri}; production -> it")
    return AliasRun(url, app, registry, meta.bundle_id, meta.top_m, workdir, quick, rep)


def deploy_alias_app(a: AliasRun, http_port: int, route_prefix: str, poll_s: float) -> dict[str, Any]:
    """Serve `<registry>/demo@production` with one Scorer replica that polls the alias every `poll_s`."""
    cfg = app_config(
        http_port=http_port,
        bundle=f"{a.registry.uri}/{ALIAS_MODEL}@production",
        name=a.app,
        route_prefix=route_prefix,
        top_m=a.top_m,
        fixed_replicas={"Router": 1, "Scorer": 1, "Calibrator": 1},
        deployment_overrides={d: {"ray_actor_options": {"num_cpus": 0.25}} for d in ("Router", "Scorer", "Calibrator")},
    )
    cfg = set_user_config(set_user_config(cfg, "Router", rollout_percentage=100), "Scorer", alias_poll_s=poll_s)
    deploy(cfg)
    a.rep.data["deploy_s"] = round(wait_app(a.app, a.url), 1)
    a.rep.data["alias_poll_s"] = poll_s
    say(f"  serving {a.registry.uri}/{ALIAS_MODEL}@production: Scorer {bundle_ids(scorer_replicas(a.app, 1))}")
    return cfg


def scale_out(a: AliasRun, cfg: dict[str, Any]) -> None:
    """A second Scorer replica joins, later, as autoscaling adds them: replicas started together
    poll the alias in step, one that joined later polls at its own phase (which then drifts: a period
    is alias_poll_s plus the registry read), so the two may swap at different times."""
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Scorer":
            d["num_replicas"] = 2
    t0 = time.monotonic()
    deploy(cfg)
    wait_for(lambda: running(a.app, "Scorer") == 2, 120, 0.5, "a second Scorer replica")
    replicas = scorer_replicas(a.app, 2)
    started = sorted(info["replica"]["started_at"] for info in replicas.values())
    a.rep.data["scale_out"] = {
        "took_s": round(time.monotonic() - t0, 1),
        "replicas": bundle_ids(replicas),
        "start_offset_s": round(started[-1] - started[0], 2),
    }
    say(f"  second Scorer replica up: {a.rep.data['scale_out']}")


def train_command(a: AliasRun) -> list[str]:
    """train_job.py as shipped, shrunk to seconds: 300 queries, 2 epochs, d_model 32, fp32, in the driver (no
    Ray Train workers; its Ray Data reads still start a second, local Ray); top_m = the served one (a
    replacement needs >=). At nice 19, as an operator runs a batch job beside serving on one box: at
    normal priority its Ray Data tasks took enough of the 2 cores for 2 of ~2,000 requests to time out."""
    w = a.workdir / "train"
    return [
        "nice", "-n", "19", sys.executable, str(REPO / "train_job.py"), "--config", str(REPO / "configs/demo.yaml"),
        "--output", f"{a.registry.uri}/{ALIAS_MODEL}", "--alias", "candidate",
        "data.generate.queries=300", "optim.max_epochs=2", "model.d_model=32", f"model.top_m={a.top_m}", "optim.amp=none",
        "scaling.num_workers=0", f"scaling.storage_path={w / 'runs'}", f"data.cache_dir={w / 'data'}",
        "bootstrap_samples=100",
    ]  # fmt: skip


def train_candidate(a: AliasRun) -> None:
    """Phase train: the real training job publishes a new bundle into the served registry under load."""
    import subprocess

    cmd = train_command(a)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    say(f"  training under load: {' '.join(cmd[3:])}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    train_s = time.monotonic() - t0
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not last.startswith("bundle "):
        raise RuntimeError(f"train_job.py failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    a.new_id = last.split()[1]
    served = set(bundle_ids(scorer_replicas(a.app, 2)).values())
    a.rep.data["train"] = {"wall_s": round(train_s, 1), "last_line": last, "served_meanwhile": sorted(served)}
    say(f"  {last} in {train_s:.1f} s; replicas still on {sorted(served)}")


def scorer_replicas(app: str, n: int, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """{replica id: its `info`} of the Scorer replicas, through the deployment handle (/v1/model asks one):
    8 concurrent calls per round (the router spreads them over the replicas) until `n` ids are seen."""
    from ray import serve

    h = serve.get_deployment_handle("Scorer", app_name=app)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < n and time.monotonic() < deadline:
        for info in [r.result(timeout_s=10) for r in [h.info.remote() for _ in range(8)]]:
            seen[info["replica"]["id"]] = info
    return seen


def bundle_ids(replicas: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {rid: info["bundle_id"] for rid, info in replicas.items()}


def move_and_converge(a: AliasRun, move: str, target: str, poll_s: float) -> None:
    """Move production (promote candidate, or roll back) under load; sample every replica's bundle id
    every 0.25 s until each one serves `target`. Times are from just before the move's write."""
    t_move = a.gen.now()
    m = a.registry.promote(ALIAS_MODEL) if move == "promote" else a.registry.rollback(ALIAS_MODEL)
    wrote_s = a.gen.now() - t_move
    say(f"  {move}: production {m.previous} -> {m.bundle_id} (move {m.seq}) at t={t_move:.1f} s")
    first_on_target: dict[str, float] = {}
    timeout_s = poll_s + ALIAS_LOAD_ALLOWANCE_S + 30
    while a.gen.now() - t_move < timeout_s:
        now = bundle_ids(scorer_replicas(a.app, 2, timeout_s=5))
        t = a.gen.now() - t_move
        for rid, bid in now.items():
            if bid == target:
                first_on_target.setdefault(rid, round(t, 2))
        if len(now) >= 2 and all(bid == target for bid in now.values()):
            break
        time.sleep(0.25)
    converged = max(first_on_target.values()) if len(first_on_target) >= 2 else None
    # a sampling round (8 info calls queued behind the load's batches, then 0.25 s) bounds the resolution
    spread = round(converged - min(first_on_target.values()), 2) if converged is not None else None
    a.rep.data[move] = {
        "at_s": round(t_move, 2),
        "from": m.previous,
        "to": m.bundle_id,
        "move_write_s": round(wrote_s, 3),
        "replica_on_target_s": first_on_target,
        "converged_s": converged,
        "replica_swap_spread_s": spread,
    }
    say(f"  {move}: every replica on {target} after {converged} s (per replica {first_on_target})")


def version_skew(records: list[Rec], t_from: float, new: str, old: str, t_to: float = float("inf")) -> dict[str, Any]:
    """The mixed-version window after an alias move at `t_from` (generator time, up to the next move at
    `t_to`): from the first response served by `new` to the last one still served by `old`, by completion
    time (what a client sees); 0 when the cut was clean."""
    done = sorted(
        (t, r.model_version) for r in records if r.status == 200 and t_from <= (t := r.t + r.latency_ms / 1000) < t_to
    )
    t_new = next((t for t, v in done if v == new), None)
    if t_new is None:
        return {"first_new_s": None, "window_s": None, "old_after_first_new": None}
    old_after = [t for t, v in done if v == old and t > t_new]
    return {
        "first_new_s": round(t_new - t_from, 3),
        "last_old_s": round(max(old_after) - t_from, 3) if old_after else None,
        "window_s": round(max(old_after) - t_new, 3) if old_after else 0.0,
        "old_after_first_new": len(old_after),
        "new_responses": sum(v == new for _, v in done),
    }


def check_alias(a: AliasRun, records: list[Rec], poll_s: float) -> None:
    s = summarize(records)
    versions = Counter(r.model_version for r in records if r.status == 200)
    ok_ids = {a.start_id, a.new_id}
    promote, rollback = a.rep.data["promote"], a.rep.data["rollback"]
    skew = {
        "promote": version_skew(records, promote["at_s"], a.new_id, a.start_id, rollback["at_s"]),
        "rollback": version_skew(records, rollback["at_s"], a.start_id, a.new_id),
    }
    a.rep.data.update(total=s, model_versions=dict(versions), skew=skew, new_bundle_id=a.new_id)
    rep, bound = a.rep, poll_s + ALIAS_LOAD_ALLOWANCE_S
    rep.check(
        "zero failed requests, zero fallbacks, every response well-formed",
        s["failed"] == 0 and not s["fallbacks"] and s["contract_violations"] == 0,
        f"{s['requests']} requests, status {s['status']}, fallbacks {s['fallbacks']}, p50 {s['latency_ms']['p50']} ms",
    )
    rep.check(
        "every response from the old or the new id (never a partial or other bundle), every one calibrated",
        set(versions) <= ok_ids and s["uncalibrated"] == 0 and all(r.calibrated for r in records if r.status == 200),
        f"versions {dict(versions)}, uncalibrated {s['uncalibrated']}",
    )
    for move in ("promote", "rollback"):
        c, k = a.rep.data[move]["converged_s"], skew[move]
        rep.check(
            f"{move}: every Scorer replica on {a.rep.data[move]['to']} within poll + allowance",
            c is not None and c <= bound,
            f"{c} s after the move (alias_poll_s {poll_s} + allowance {ALIAS_LOAD_ALLOWANCE_S} = {bound} s); "
            f"replicas seen on it {a.rep.data[move]['replica_swap_spread_s']} s apart",
        )
        rep.check(f"{move}: the moved-to id served", k["first_new_s"] is not None, f"first after {k['first_new_s']} s")
        rep.note(
            f"{move}: version-skew window",
            f"{k['window_s']} s between the first response from the new id and the last from the old "
            f"({k['old_after_first_new']} old-id responses after the first new-id one)",
        )
    rep.note("training job wall time (under load)", f"{a.rep.data['train']['wall_s']} s")


# ============================================================================ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=["autoscale", "faults", "load", "alias", "all"])
    p.add_argument("--quick", action="store_true", help="shorter phases; load: 1,000 requests instead of 10,000")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--bundle", help="bundle dir or registry URI (default artifacts/registry/demo@production; tiny one if missing)"
    )
    p.add_argument("--requests", type=int, help="load: number of requests (default 10,000; --quick 1,000)")
    p.add_argument("--concurrency", type=int, default=32, help="load: concurrency (default 32)")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray (default 2, the box)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The recipe: a bundle copy, one local cluster, each scenario in turn, the summary."""
    args = parse_args(argv)
    scenarios = ["autoscale", "faults", "load", "alias"] if args.scenario == "all" else [args.scenario]
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": basic_machine(),
        "loadavg_before": loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": [],
    }
    say(f"reliability {scenarios}: loadavg {out['loadavg_before']} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="cotrr-rel-") as tmp:
        reports = run_scenarios(args, scenarios, Path(tmp), out)
    out["loadavg_after"] = loadavg()
    out["results"] = [r.to_dict() for r in reports]
    out["pass"] = all(r.passed for r in reports)
    print_summary(reports, out)
    if args.json:
        write_json(out, args.json, indent=2, default=str, newline=True)
        say(f"wrote {args.json}")
    return 0 if out["pass"] else 1


def run_scenarios(args: argparse.Namespace, scenarios: list[str], workdir: Path, out: dict[str, Any]) -> list[Report]:
    from cotrr_ray.bundles.bundle import read_meta

    bundle = prepare_bundle(args.bundle, workdir)
    meta = read_meta(bundle)
    out["bundle"] = {"bundle_id": meta.bundle_id, "top_m": meta.top_m}
    reports = []
    with object_store("alias" in scenarios, workdir) as registry_root, Cluster(args.num_cpus) as cluster:
        out["ray_start_s"] = round(cluster.start_s, 1)
        for name in scenarios:
            say(f"== {name}")
            t0 = time.monotonic()
            la = loadavg()
            try:
                rep = run_scenario(name, args, cluster, bundle, workdir, meta.top_m, registry_root)
            except Exception as e:  # noqa: BLE001 - a crashed scenario is a failed check, reported
                rep = Report(name)
                rep.check("scenario ran to the end", False, f"{type(e).__name__}: {e}")
            rep.data["loadavg_start"], rep.data["loadavg_end"] = la, loadavg()
            rep.data["seconds"] = round(time.monotonic() - t0, 1)
            reports.append(rep)
            with contextlib.suppress(Exception):
                from ray import serve

                serve.delete(APP)
    return reports


def run_scenario(
    name: str,
    args: argparse.Namespace,
    cluster: Cluster,
    bundle: Path,
    workdir: Path,
    top_m: int,
    registry_root: str | None = None,
) -> Report:
    if name == "autoscale":
        deploy(autoscale_config(cluster.http_port, str(bundle), top_m))
        deploy_s = wait_app(APP, cluster.url)
        rep = scenario_autoscale(cluster.url, APP, make_bodies(top_m), quick=args.quick)
        rep.data["deploy_s"] = round(deploy_s, 1)
        return rep
    if name == "alias":
        return scenario_alias(cluster.url, cluster.http_port, registry_root, bundle, workdir, quick=args.quick)
    if name == "faults":
        return scenario_faults(cluster.url, bundle, workdir, quick=args.quick, http_port=cluster.http_port)
    n = args.requests or (1_000 if args.quick else 10_000)
    return scenario_load(cluster.url, bundle, n=n, concurrency=args.concurrency, http_port=cluster.http_port)


def print_summary(reports: list[Report], out: dict[str, Any]) -> None:
    print()
    say("summary")
    for r in reports:
        for c in r.checks:
            print(f"  {'PASS' if c.ok else 'FAIL'}  {r.scenario:<9} {c.name}")
        for n in r.data.get("notes", []):
            print(f"  INFO  {r.scenario:<9} {n['name']}: {n['detail']}")
    print(
        f"  => {'PASS' if out['pass'] else 'FAIL'} (loadavg before {out['loadavg_before']}, after {out['loadavg_after']})"
    )


if __name__ == "__main__":
    sys.exit(main())
