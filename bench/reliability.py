#!/usr/bin/env python
"""Reliability checks of the Serve application on a fresh local Ray: autoscaling, faults, load.

    python bench/reliability.py autoscale|faults|load|all [--quick] [--json OUT] [--bundle DIR]

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
  killed replicas, control latency unchanged by a slow or failing shadow, the refused bundles are
  reported and the previous bundle keeps serving.
- load: serve_config.yaml as shipped (host/port/bundle only), 10,000 requests at concurrency 32
  (`--quick`: 1,000): zero errors, p50/p95/p99, throughput, fallbacks.

Request bodies: 32 synthetic queries (fixed seed, queries the model never saw), 40 candidates each,
the first top_m with base64 features. The bundle (default artifacts/bundles/demo, copied to a temp
dir first so a concurrent retrain cannot change it mid-run) is built tiny on the fly if missing.

tests/test_reliability.py imports this module (LoadGen, check_response, app_config, replica helpers,
tamper, scenario_autoscale) and runs reduced versions against the test session's Serve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench"):  # the package and bench/kit, however this file is run or loaded
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import orjson  # noqa: E402
from kit.bodies import Body, body_from_dict, synthetic_bodies  # noqa: E402, F401  (tests: rel.<name>)
from kit.bundles import prepare_bundle, tamper  # noqa: E402, F401
from kit.cluster import (  # noqa: E402, F401
    APP,
    Cluster,
    app_config,
    app_status,
    deploy,
    free_port,
    httpx_get,
    kill_replica,
    replica_actors,
    replica_states,
    running,
    set_user_config,
    wait_app,
    wait_config,
    wait_for,
)
from kit.load import Rec, RecordingLoadGen, pct, summarize  # noqa: E402, F401
from kit.machine import basic_machine, loadavg, say  # noqa: E402, F401
from kit.report import Check, Report, write_json  # noqa: E402, F401

# ============================================================================ request bodies


def make_bodies(top_m: int, *, n_bodies: int = 32, n_candidates: int = 40, seed: int = 20_000) -> list[Body]:
    """Synthetic rerank requests (labels removed): the first top_m candidates carry base64 features."""
    return synthetic_bodies(n_bodies=n_bodies, n_candidates=n_candidates, top_m=top_m, seed=seed, query_prefix="rel-q")


# ============================================================================ response contract


def check_response(out: Any, body: Body) -> str | None:
    """None if `out` is a well-formed rerank response for `body`, else what is wrong.

    - fallback set -> the upstream order, nothing scored, not calibrated;
    - no model (control without a bundle) -> the upstream order;
    - model -> the window sorted by score (ties by upstream index), the tail in upstream order,
      probabilities in [0, 1] iff calibrated.
    """
    if not isinstance(out, dict) or set(out) != {
        "request_id",
        "model_version",
        "arm",
        "shadow",
        "fallback",
        "calibrated",
        "results",
    }:
        return f"bad response keys: {str(out)[:200]}"
    res = out["results"]
    n = len(body.ids)
    if len(res) != n or [x["rank"] for x in res] != list(range(n)):
        return f"{len(res)} results for {n} candidates or bad ranks"
    if any(body.ids[x["index"]] != x["id"] for x in res):
        return "id does not match its upstream index"
    idx = [x["index"] for x in res]
    if out["fallback"] is not None or out["model_version"] is None:
        if idx != list(range(n)) or any(x["reranked"] or x["score"] is not None for x in res):
            return f"fallback {out['fallback']!r} but not the upstream order"
        if out["calibrated"]:
            return "calibrated without a model"
        return None
    w = body.window
    head, tail = res[:w], res[w:]
    if sorted(x["index"] for x in head) != list(range(w)) or [x["index"] for x in tail] != list(range(w, n)):
        return "window/tail split broken"
    if not all(x["reranked"] for x in head) or any(x["reranked"] for x in tail):
        return "reranked flags wrong"
    for a, b in zip(head[:-1], head[1:]):
        if not (a["score"] > b["score"] or (a["score"] == b["score"] and a["index"] < b["index"])):
            return "window not ordered by the scorer's logits"
    probs = [x["probability"] for x in head]
    if out["calibrated"]:
        if not all(p is not None and 0.0 <= p <= 1.0 for p in probs):
            return "calibrated but probabilities missing or outside [0, 1]"
    elif any(p is not None for p in probs):
        return "probabilities present although calibrated is false"
    return None


# ============================================================================ load generator


class LoadGen(RecordingLoadGen):
    """`kit.load.RecordingLoadGen` checking every 200 against the rerank contract (`check_response`)."""

    check_response = staticmethod(check_response)


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
    timeline: list[dict[str, Any]] = []
    stop_sampling = threading.Event()
    gen = LoadGen(url, bodies, concurrency=0, max_concurrency=max(c for c, _ in ramp))

    def sample() -> None:
        while not stop_sampling.is_set():
            states = replica_states(app)
            timeline.append(
                {
                    "t": round(gen.now(), 1),
                    "concurrency": gen.concurrency,
                    **{d: states.get(d, {}) for d in ("Router", "Scorer", "Calibrator")},
                }
            )
            stop_sampling.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    gen.start()
    sampler.start()
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
    t_stop = gen.now()
    gen.set_concurrency(0)
    gen.stop()
    say(f"  load stopped at t={t_stop:.0f} s; waiting up to {down_budget_s} s for scale-down")

    def at_min() -> bool:  # only min_replicas left, nothing STARTING or STOPPING
        states = replica_states(app)
        return all(states.get(d, {}) == {"RUNNING": AUTOSCALE[d]["min_replicas"]} for d in ("Scorer", "Calibrator"))

    with contextlib.suppress(TimeoutError):
        wait_for(at_min, down_budget_s + 30, 1.0, "scale-down")
    time.sleep(1.5)
    stop_sampling.set()
    sampler.join()

    def first(pred, after: float = 0.0) -> float | None:
        return next((s["t"] for s in timeline if s["t"] >= after and pred(s)), None)

    def n_run(s: dict, dep: str) -> int:
        return s[dep].get("RUNNING", 0)

    t_scorer_max = first(lambda s: n_run(s, "Scorer") >= smax)
    t_cal_max = first(lambda s: n_run(s, "Calibrator") >= cmax)
    t_scorer_down = first(lambda s: n_run(s, "Scorer") == 1 and sum(s["Scorer"].values()) == 1, after=t_stop)
    t_cal_down = first(lambda s: n_run(s, "Calibrator") == 1 and sum(s["Calibrator"].values()) == 1, after=t_stop)
    windows = []
    for t0 in range(0, int(t_stop) + 1, 5):
        s = summarize(gen.records, t0, t0 + 5)
        if s["requests"]:
            at = [x for x in timeline if t0 <= x["t"] < t0 + 5] or [{}]
            windows.append(
                {
                    "t": f"{t0}-{t0 + 5}",
                    "concurrency": at[-1].get("concurrency"),
                    "requests": s["requests"],
                    "rps": s["throughput_rps"],
                    "p50_ms": s["latency_ms"]["p50"],
                    "p99_ms": s["latency_ms"]["p99"],
                    "failed": s["failed"],
                    "fallbacks": sum(s["fallbacks"].values()),
                    "scorer_running": at[-1].get("Scorer", {}).get("RUNNING"),
                    "calibrator_running": at[-1].get("Calibrator", {}).get("RUNNING"),
                }
            )
    total = summarize(gen.records)
    rep.data.update(
        config=AUTOSCALE,
        cpus=AUTOSCALE_CPUS,
        phases=phases,
        load_stopped_at_s=round(t_stop, 1),
        timeline=timeline,
        windows=windows,
        total=total,
        times_s={
            "scorer_at_max": t_scorer_max,
            "calibrator_at_max": t_cal_max,
            "scorer_back_to_min": t_scorer_down,
            "calibrator_back_to_min": t_cal_down,
        },
    )
    say(
        f"  {'t(s)':>7} {'c':>3} {'req':>5} {'rps':>6} {'p50':>7} {'p99':>7} {'fail':>4} {'fb':>4} {'scorers':>7} {'calib':>5}"
    )
    for w in windows:
        say(
            f"  {w['t']:>7} {w['concurrency']!s:>3} {w['requests']:>5} {w['rps']!s:>6} {w['p50_ms']!s:>7} "
            f"{w['p99_ms']!s:>7} {w['failed']:>4} {w['fallbacks']:>4} {w['scorer_running']!s:>7} {w['calibrator_running']!s:>5}"
        )
    rep.check(
        "Scorer scales up to max_replicas under load", t_scorer_max is not None, f"{smax} RUNNING at t={t_scorer_max} s"
    )
    rep.check(
        "Calibrator scales up to max_replicas under load", t_cal_max is not None, f"{cmax} RUNNING at t={t_cal_max} s"
    )
    for dep, t_down in (("Scorer", t_scorer_down), ("Calibrator", t_cal_down)):
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
    return rep


# ============================================================================ faults


def kill_under_load(
    url: str,
    app: str,
    bodies: list[Body],
    deployment: str,
    *,
    kill_all: bool,
    concurrency: int,
    replace_timeout_s: float,
    settle_s: float = 3.0,
) -> dict[str, Any]:
    """Sustained load; `ray.kill` one (or every) replica actor of `deployment` after `settle_s`; keep
    the load on until Serve has replaced them (same count RUNNING, new actor names), then `settle_s`
    more. Returns counts for the whole run and for the outage (kill -> replaced)."""
    before = replica_actors(app, deployment)
    want = len(before)
    gen = LoadGen(url, bodies, concurrency=concurrency).start()
    time.sleep(settle_s)
    victims = before if kill_all else before[:1]
    t_kill = gen.now()
    for v in victims:
        kill_replica(v)
    say(f"  killed {len(victims)} {deployment} replica(s) at t={t_kill:.1f} s under concurrency {concurrency}")

    def replaced():
        now = replica_actors(app, deployment)
        return len(now) == want and not set(victims) & set(now) and running(app, deployment) == want and now

    try:
        after = wait_for(replaced, replace_timeout_s, 0.25, f"{deployment} replacement")
        t_replaced = gen.now()
    except TimeoutError:
        after, t_replaced = replica_actors(app, deployment), None
    time.sleep(settle_s)
    records = gen.stop()
    total = summarize(records)
    during = summarize(records, t_kill, t_replaced or float("inf"))
    return {
        "deployment": deployment,
        "killed": len(victims),
        "replicas": want,
        "kill_at_s": round(t_kill, 1),
        "replaced_after_s": None if t_replaced is None else round(t_replaced - t_kill, 1),
        "new_replicas": sorted(set(after) - set(before)),
        "total": total,
        "during_outage": during,
    }


def scenario_faults(cluster_url: str, bundle: Path, workdir: Path, *, quick: bool, http_port: int) -> Report:
    from cotrr_ray.bundles.bundle import read_meta

    rep = Report("faults")
    meta = read_meta(bundle)
    control = workdir / "control"
    shutil.copytree(bundle, control)
    bodies = make_bodies(meta.top_m)
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
    conc = 8

    say("fault 1: kill one Scorer replica under load")
    r = kill_under_load(cluster_url, APP, bodies, "Scorer", kill_all=False, concurrency=conc, replace_timeout_s=90)
    rep.data["scorer_kill_one"] = r
    t = r["total"]
    rep.check("scorer kill: zero failed requests", t["failed"] == 0, f"{t['requests']} requests, status {t['status']}")
    rep.check(
        "scorer kill: every response well-formed (fallbacks in upstream order)",
        t["contract_violations"] == 0,
        f"fallbacks {t['fallbacks']}",
    )
    rep.check(
        "scorer kill: Serve replaced the replica",
        r["replaced_after_s"] is not None,
        f"after {r['replaced_after_s']} s: {r['new_replicas']}",
    )

    say("fault 2: kill every Scorer replica under load")
    r = kill_under_load(cluster_url, APP, bodies, "Scorer", kill_all=True, concurrency=conc, replace_timeout_s=120)
    rep.data["scorer_kill_all"] = r
    t, d = r["total"], r["during_outage"]
    rep.check(
        "all scorers killed: zero failed requests", t["failed"] == 0, f"{t['requests']} requests, status {t['status']}"
    )
    rep.check(
        "all scorers killed: outage answered in upstream order with fallback set",
        t["contract_violations"] == 0 and sum(d["fallbacks"].values()) > 0,
        f"during the outage {d['requests']} requests, fallbacks {d['fallbacks']}",
    )
    rep.check(
        "all scorers killed: Serve replaced both", r["replaced_after_s"] is not None, f"after {r['replaced_after_s']} s"
    )

    say("fault 3: kill the Calibrator replica under load")
    r = kill_under_load(cluster_url, APP, bodies, "Calibrator", kill_all=True, concurrency=4, replace_timeout_s=90)
    rep.data["calibrator_kill"] = r
    t, d = r["total"], r["during_outage"]
    rep.check(
        "calibrator kill: zero failed requests", t["failed"] == 0, f"{t['requests']} requests, status {t['status']}"
    )
    rep.check(
        "calibrator kill: still ordered by the scorer, calibrated false while it is down",
        t["contract_violations"] == 0 and t["uncalibrated"] > 0,
        f"{t['uncalibrated']} uncalibrated (model-ordered) answers, fallbacks {t['fallbacks']}",
    )
    rep.check(
        "calibrator kill: Serve replaced it", r["replaced_after_s"] is not None, f"after {r['replaced_after_s']} s"
    )

    say("fault 4: shadow treatment slow, then failing; control answers")
    shadow_cfg = set_user_config(cfg, "Router", shadow_mode=True, shadow_timeout_ms=300)
    phases = {}
    seconds = 6 if quick else 12
    for phase, fault in (
        ("healthy", {"fault": "none"}),
        ("slow", {"fault": "slow", "fault_delay_s": 2.0}),
        ("failing", {"fault": "raise"}),
    ):
        deploy(set_user_config(shadow_cfg, "Scorer", **fault))
        wait_config(cluster_url, routing={"shadow_mode": True}, scorer=fault)
        time.sleep(1.0)
        before = orjson.loads(httpx_get(cluster_url + "/v1/stats"))["shadow"]
        gen = LoadGen(cluster_url, bodies, concurrency=4).start()
        time.sleep(seconds)
        s = summarize(gen.stop())
        after = orjson.loads(httpx_get(cluster_url + "/v1/stats"))["shadow"]
        shadow = {k: after[k] - before[k] for k in ("comparisons", "errors", "timeouts", "dropped")}
        arms = Counter(rec.arm for rec in gen.records)
        phases[phase] = {
            **s,
            "shadow": shadow,
            "arms": dict(arms),
            "control_versions": sorted({rec.model_version for rec in gen.records if rec.model_version}),
        }
        say(
            f"  {phase}: p50 {s['latency_ms']['p50']} ms p99 {s['latency_ms']['p99']} ms, {s['requests']} requests, "
            f"status {s['status']}, shadow {shadow}"
        )
    deploy(set_user_config(cfg, "Scorer", fault="none"))
    wait_config(cluster_url, routing={"shadow_mode": False}, scorer={"fault": "none"})
    rep.data["shadow"] = phases
    base = phases["healthy"]["latency_ms"]
    for phase in ("slow", "failing"):
        p = phases[phase]
        rep.check(
            f"shadow {phase}: control responses all 200, ordered, arm=control",
            p["failed"] == 0 and p["contract_violations"] == 0 and set(p["arms"]) == {"control"} and not p["fallbacks"],
            f"{p['requests']} requests, arms {p['arms']}",
        )
        bound = max(1.5 * base["p50"], base["p50"] + 25)
        rep.check(
            f"shadow {phase}: control latency unaffected",
            p["latency_ms"]["p50"] <= bound,
            f"p50 {p['latency_ms']['p50']} ms vs healthy {base['p50']} ms (bound {bound:.0f}); "
            f"p99 {p['latency_ms']['p99']} vs {base['p99']} ms",
        )
    rep.check(
        "shadow slow: treatment timeouts/drops counted",
        phases["slow"]["shadow"]["timeouts"] + phases["slow"]["shadow"]["dropped"] + phases["slow"]["shadow"]["errors"]
        > 0,
        str(phases["slow"]["shadow"]),
    )
    rep.check(
        "shadow failing: treatment errors counted",
        phases["failing"]["shadow"]["errors"] > 0,
        str(phases["failing"]["shadow"]),
    )

    say("fault 5: hot swap to bad bundles under load")
    gen = LoadGen(cluster_url, bodies, concurrency=4).start()
    swaps = {}
    for kind in ("corrupt", "missing", "spec"):
        bad = tamper(bundle, workdir / f"bad-{kind}", kind)
        deploy(set_user_config(cfg, "Scorer", bundle_uri=str(bad)))
        try:
            model = wait_config(cluster_url, scorer={"bundle_uri": str(bad)})
            err = (model.get("scorer") or {}).get("last_swap_error") or ""
            swaps[kind] = {"model_version": model.get("model_version"), "last_swap_error": err}
        except TimeoutError as e:
            swaps[kind] = {"error": str(e)}
        say(f"  {kind}: {swaps[kind]}")
    deploy(set_user_config(cfg, "Scorer", bundle_uri=None))
    wait_config(cluster_url, scorer={"bundle_uri": None})
    time.sleep(1.0)
    s = summarize(gen.stop())
    versions = Counter(rec.model_version for rec in gen.records)
    rep.data["hot_swap"] = {"swaps": swaps, "load": s, "model_versions": dict(versions)}
    for kind, expect in (("corrupt", "checksum mismatch"), ("missing", "missing file"), ("spec", "not the served one")):
        err = swaps[kind].get("last_swap_error", "")
        rep.check(f"hot swap {kind}: refused with a clear message", expect in err, err[:160])
    rep.check(
        "hot swap: previous bundle kept serving, zero failed requests",
        s["failed"] == 0 and s["contract_violations"] == 0 and set(versions) == {meta.bundle_id} and not s["fallbacks"],
        f"{s['requests']} requests, versions {dict(versions)}, fallbacks {s['fallbacks']}",
    )

    say("fault 6: a Scorer replica dies while a refused bundle is still configured")
    bad = workdir / "bad-corrupt"
    deploy(set_user_config(cfg, "Scorer", bundle_uri=str(bad)))
    wait_config(cluster_url, scorer={"bundle_uri": str(bad)})
    r = kill_under_load(
        cluster_url, APP, bodies, "Scorer", kill_all=False, concurrency=4, replace_timeout_s=20 if quick else 40
    )
    st = app_status(APP).deployments["Scorer"]
    r["scorer_status"], r["scorer_message"] = str(st.status), st.message.splitlines()[0][:200] if st.message else ""
    rep.data["kill_with_refused_bundle_configured"] = r
    t_revert = time.monotonic()
    deploy(set_user_config(cfg, "Scorer", bundle_uri=None))
    wait_config(cluster_url, scorer={"bundle_uri": None})
    try:
        wait_for(lambda: replica_states(APP).get("Scorer") == {"RUNNING": 2}, 90, 0.5, "2 Scorer replicas after revert")
        r["restored_after_revert_s"] = round(time.monotonic() - t_revert, 1)
    except TimeoutError:
        r["restored_after_revert_s"] = None
    t = r["total"]
    rep.check(
        "refused bundle configured + replica death: zero failed requests, the survivor serves",
        t["failed"] == 0 and t["contract_violations"] == 0,
        f"{t['requests']} requests, fallbacks {t['fallbacks']}",
    )
    rep.check(
        "refused bundle configured + replica death: full capacity back after reverting bundle_uri",
        r["restored_after_revert_s"] is not None,
        f"2 Scorer replicas RUNNING {r['restored_after_revert_s']} s after the revert",
    )
    rep.note(
        "refused bundle configured + replica death: replacement",
        f"replaced after {r['replaced_after_s']} s; Scorer {r['scorer_status']}: {r['scorer_message']} "
        "(a fresh replica refuses to start on a bundle it cannot load: revert bundle_uri after a refused swap)",
    )
    return rep


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


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=["autoscale", "faults", "load", "all"])
    p.add_argument("--quick", action="store_true", help="shorter phases; load: 1,000 requests instead of 10,000")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--bundle", help="bundle directory (default artifacts/bundles/demo; tiny one built if missing)")
    p.add_argument("--requests", type=int, help="load: number of requests (default 10,000; --quick 1,000)")
    p.add_argument("--concurrency", type=int, default=32, help="load: concurrency (default 32)")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray (default 2, the box)")
    args = p.parse_args(argv)

    scenarios = ["autoscale", "faults", "load"] if args.scenario == "all" else [args.scenario]
    out: dict[str, Any] = {
        "command": " ".join(["python", "bench/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "loadavg_before": loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": [],
    }
    say(f"reliability {scenarios}: loadavg {out['loadavg_before']} on {os.cpu_count()} CPUs")
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="cotrr-rel-") as tmp:
        workdir = Path(tmp)
        bundle = prepare_bundle(args.bundle, workdir)
        from cotrr_ray.bundles.bundle import read_meta

        meta = read_meta(bundle)
        out["bundle"] = {"bundle_id": meta.bundle_id, "top_m": meta.top_m}
        with Cluster(args.num_cpus) as cluster:
            out["ray_start_s"] = round(cluster.start_s, 1)
            for name in scenarios:
                say(f"== {name}")
                t0 = time.monotonic()
                la = loadavg()
                try:
                    if name == "autoscale":
                        cfg = autoscale_config(cluster.http_port, str(bundle), meta.top_m)
                        deploy(cfg)
                        deploy_s = wait_app(APP, cluster.url)
                        rep = scenario_autoscale(cluster.url, APP, make_bodies(meta.top_m), quick=args.quick)
                        rep.data["deploy_s"] = round(deploy_s, 1)
                    elif name == "faults":
                        rep = scenario_faults(
                            cluster.url, bundle, workdir, quick=args.quick, http_port=cluster.http_port
                        )
                    else:
                        n = args.requests or (1_000 if args.quick else 10_000)
                        rep = scenario_load(
                            cluster.url, bundle, n=n, concurrency=args.concurrency, http_port=cluster.http_port
                        )
                except Exception as e:  # noqa: BLE001 - a crashed scenario is a failed check, reported
                    rep = Report(name)
                    rep.check("scenario ran to the end", False, f"{type(e).__name__}: {e}")
                rep.data["loadavg_start"], rep.data["loadavg_end"] = la, loadavg()
                rep.data["seconds"] = round(time.monotonic() - t0, 1)
                reports.append(rep)
                with contextlib.suppress(Exception):
                    from ray import serve

                    serve.delete(APP)
    out["loadavg_after"] = loadavg()
    out["results"] = [r.to_dict() for r in reports]
    out["pass"] = all(r.passed for r in reports)
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        say(f"wrote {args.json}")
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
