#!/usr/bin/env python
"""Cost of online experiments: serving throughput and p50 with the event log and interleaving ON vs OFF.

    flock /tmp/ray.lock python bench/experiments_cost.py [--quick] [--json OUT]

Issue #14 ("Cost"), goal: <= 5% throughput loss. Two configurations of serve_config.yaml:

- OFF: as shipped (rollout_percentage 100, mode ab, `args.event_log.uri: null`);
- ON: the same plus `args.event_log.uri` = a fresh temporary directory and the Router's
  `user_config.mode: interleave`; with rollout 100 every request is the team-draft merge of the
  treatment's window and the upstream order (no control bundle), and every decision is written to
  the event log (`cotrr_ray.experiments.eventlog`: buffered, written + fsync'ed every
  `event_log.commit_interval_s`, 0.2 s).

Phases (functions below, in this order):

1. setup: the bundle (default artifacts/registry/demo@production, what serve_bench serves; train it with
   `flock /tmp/ray.lock python train_job.py --config configs/demo.yaml`), the request bodies
   (`serve_bench.make_bodies`: 100 candidates, Top-20 with features, JSON floats or base64), the
   machine record;
2. configs: OFF and ON built with `kit.cluster.serve_config_for_bench` (only HTTP host/port and the
   absolute bundle path differ from the shipped file) plus the two ON edits;
3. router_cpu (Ray-free, in this process, `--router-requests N`, 0 = skip): the Router's own CPU
   per request, OFF vs ON, alternating `--router-repeats` times: the same `RerankService` a replica
   runs (parse, assignment, interleaving, response, exposure and decision records, the event log's
   writer thread), its downstream answered at once with precomputed windows, so the model and the
   Serve hops (the same in both configurations) are left out. Process CPU time per request, c=1 and
   16 concurrent, the least of the repeats (interference only adds); ON - OFF is what ON adds to the Router, the bottleneck of the graph on this box.
   Unlike throughput on a shared 2-core box (runs minutes apart differ by up to 1.8x), CPU time per
   request of one process hardly depends on what else runs;
4. runs: the configurations alternately, OFF, ON, OFF, ON (`--order`; ABAB cancels linear drift on
   a shared box), each on its own fresh local Ray + Serve in a child process of this script
   (`kit.cluster.ServeCluster`, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, load on the Router's direct-ingress
   port), closed-loop load from `kit.load.LoadGen` (wrk, or the httpx client when wrk is absent) at
   each concurrency (default 1, 16, 32) and encoding, warm-up discarded; per level: rps, p50/p99,
   errors, fallbacks, CPU per process (`kit.machine.CpuMeter`: foreign_cores = other people's
   processes) and /proc/loadavg before and after the measured window. ON runs also count the decision
   records in their log and check they are interleaved (items with a team);
   Optional (`--py-spy ENC:C:SECONDS`): py-spy samples the Router replica during that level of every
   run; the samples are booked to the decision record, the event log's writer thread, interleaving,
   request parsing and other, with the heaviest leaf stacks (`py_spy` in each run's result);
5. summary: per (encoding, concurrency) the mean over the runs of each configuration and the ratio
   ON / OFF of the means (rps and p50), plus the per-pair ratios (run k ON / run k OFF); and the
   throughput ratio the Router's CPU alone predicts: OFF Router ms / (OFF Router ms + ON's added ms),
   with OFF's Router ms per request measured in the Serve runs.

Writes bench/results/experiments-cost.json (or `--json`) and prints a table. `--quick`: JSON bodies,
c=16, OFF then ON, 1 s warm-up + 2 s per level (a smoke run, ~1 minute). No timed assertions.
Every run starts Ray: wrap it in `flock /tmp/ray.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

from kit.cluster import SERVE_ENV, ServeCluster, free_port, serve_config_for_bench  # noqa: E402
from kit.load import Bench, LoadGen  # noqa: E402
from kit.machine import loadavg, run_header, say  # noqa: E402
from kit.report import write_json  # noqa: E402
from serve_bench import N_BODIES, N_CANDIDATES, TOP_M, make_bodies  # noqa: E402

CONFIGS = ("OFF", "ON")
DEFAULT_ORDER = "OFF,ON,OFF,ON"
DEFAULT_LEVELS = "1,16,32"
GOAL_MAX_LOSS = 0.05  # issue #14: <= 5% throughput loss


# ============================================================================ configurations


def serve_config(name: str, serve_cfg_path: Path, *, http_port: int, bundle_uri: str, event_dir: Path) -> dict:
    """OFF: serve_config.yaml as shipped (bench edits only); ON: + event log at `event_dir`, mode interleave."""
    cfg = serve_config_for_bench(serve_cfg_path, http_port=http_port, bundle_uri=bundle_uri)
    if name == "ON":
        app = cfg["applications"][0]
        app["args"]["event_log"] = {**(app["args"].get("event_log") or {}), "uri": str(event_dir)}
        router = next(d for d in app["deployments"] if d["name"] == "Router")
        router.setdefault("user_config", {})["mode"] = "interleave"
    elif name != "OFF":
        raise ValueError(name)
    return cfg


def config_summary(cfg: dict) -> dict[str, Any]:
    """What distinguishes the configurations, read back from the config that was deployed."""
    app = cfg["applications"][0]
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    uc = router.get("user_config") or {}
    return {
        "event_log_uri": (app["args"].get("event_log") or {}).get("uri"),
        "mode": uc.get("mode", "ab"),
        "rollout_percentage": uc.get("rollout_percentage"),
        "control_bundle_uri": app["args"].get("control_bundle_uri"),
    }


def count_decisions(event_dir: Path) -> dict[str, int]:
    """Decision records in an ON run's log: how many, how many in interleave mode with teams set."""
    out = {"decisions": 0, "interleave_mode": 0, "with_teams": 0, "segments": 0}
    for seg in sorted(event_dir.glob("kind=decision/**/*.jsonl")):
        out["segments"] += 1
        for line in seg.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out["decisions"] += 1
            out["interleave_mode"] += rec.get("mode") == "interleave"
            out["with_teams"] += bool((rec.get("items") or {}).get("team"))
    return out


# ============================================================================ one configuration (child process)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration on a fresh local Ray + Serve: deploy, every (encoding, concurrency) level, shut down."""
    t0 = time.perf_counter()
    work = Path(spec["work"])
    event_dir = work / "events"
    cluster = ServeCluster(mode=spec["mode"], num_cpus=spec["num_cpus"], metrics_port=free_port(), log_dir=work)
    gens = {
        enc: LoadGen([Path(p).read_bytes() for p in spec["bodies"][enc]], kind=spec["client"])
        for enc in spec["encodings"]
    }
    bench = Bench(argparse.Namespace(), max_foreign=None)  # no re-measuring: ABAB handles drift, foreign cores recorded
    out: dict[str, Any] = {"name": spec["name"], "index": spec["index"], "load_before": loadavg()}
    try:
        cluster.start()
        cfg = serve_config(
            spec["name"],
            Path(spec["serve_config"]),
            http_port=free_port(),
            bundle_uri=spec["bundle"],
            event_dir=event_dir,
        )
        out["config"] = config_summary(cfg)
        out["deploy_s"] = round(cluster.deploy(cfg), 2)
        out["ray_init_s"] = round(cluster.ray_start_s, 2)
        out["client"] = next(iter(gens.values())).kind
        say(f"{spec['name']}#{spec['index']} up: deploy {out['deploy_s']} s, {config_summary(cfg)}")
        rows = []
        for enc in spec["encodings"]:
            for c in spec["levels"]:
                spy = start_py_spy(spec, cluster, enc, c, work)
                r = bench.level(
                    gens[enc],
                    cluster.url_base + "/v1/rerank",
                    c,
                    warmup_s=spec["warmup"],
                    duration_s=spec["duration"],
                    scrape=cluster.scrape,
                )
                if spy is not None:
                    out["py_spy"] = finish_py_spy(spy, enc, c)
                r["encoding"] = enc
                r["loadavg_end"] = loadavg()
                rows.append(r)
                say(
                    f"{spec['name']}#{spec['index']} {enc} c={c}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.2f} ms "
                    f"p99 {r['p99_ms']:.1f} err {r['errors']} fb {r['fallbacks']} load {r['loadavg']} "
                    f"foreign {r['cpu']['foreign_cores']} cpu {r['cpu']['per_process']}"
                )
        out["levels"] = rows
    finally:
        cluster.shutdown()
        for g in gens.values():
            shutil.rmtree(g.workdir, ignore_errors=True)
    if spec["name"] == "ON":
        time.sleep(0.5)
        out["event_log"] = count_decisions(event_dir)
        say(f"{spec['name']}#{spec['index']} event log: {out['event_log']}")
    out["load_after"] = loadavg()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def start_py_spy(spec: dict[str, Any], cluster: ServeCluster, enc: str, c: int, work: Path) -> dict | None:
    """Optional profile (`--py-spy ENC:C:SECONDS`): sample the Router replica with py-spy during that
    level (it starts with the warm-up: keep SECONDS <= warm-up + duration); collapsed stacks."""
    ps = spec.get("py_spy")
    if not ps or (ps["encoding"], ps["concurrency"]) != (enc, c):
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    pids = cluster.replica_pids("Router")
    if not pids or not Path(exe).exists():
        say(f"py-spy: not run (router pids {pids}, py-spy {exe})")
        return None
    raw = work / "router.txt"
    cmd = [exe, "record", "-p", str(pids[0]), "-d", str(ps["seconds"]), "-r", "200", "-f", "raw"]
    proc = subprocess.Popen([*cmd, "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"proc": proc, "raw": raw}


# Where a Router sample's time is booked: the first rule whose substring occurs in its stack (frames
# joined by ';'), in this order; "other" otherwise. Idle = the event loop waiting (epoll/select).
SPY_BUCKETS = (
    ("event log: decision record build/queue (service._log_decision)", "_log_decision"),
    ("event log: writer thread (eventlog)", "eventlog.py"),
    ("interleaving (team_draft)", "interleaving.py"),
    ("request parsing", "api.py"),
    ("idle (event loop wait)", "select"),
)


def finish_py_spy(spy: dict[str, Any], enc: str, c: int) -> dict[str, Any]:
    try:
        _, err = spy["proc"].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        spy["proc"].kill()
        err = b"timeout"
    raw: Path = spy["raw"]
    if not raw.exists():
        return {"error": (err or b"").decode(errors="replace")[-500:]}
    return summarize_py_spy(raw.read_text(), encoding=enc, concurrency=c)


def summarize_py_spy(text: str, **about: Any) -> dict[str, Any]:
    """Samples per bucket (SPY_BUCKETS) of a py-spy `-f raw` file; shares of all and of busy samples."""
    counts: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        label = next((lab for lab, key in SPY_BUCKETS if key in stack), "other")
        counts[label] = counts.get(label, 0) + int(n)
    idle = sum(v for k, v in counts.items() if k.startswith("idle"))
    tops: dict[str, int] = {}  # the innermost 3 frames of each stack, summed: what the busy samples were doing
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            tail = ";".join(f.split(" (")[0] for f in stack.split(";")[-3:])
            tops[tail] = tops.get(tail, 0) + int(n)
    busy = max(1, total - idle)
    return {
        **about,
        "samples": total,
        "share_of_busy": {k: round(v / busy, 3) for k, v in counts.items() if not k.startswith("idle")},
        "idle_share": round(idle / max(1, total), 3),
        "top_leaf_stacks": [[k, v] for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:15]],
    }


def _one_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_one(spec)))


# ============================================================================ the recipe (parent)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """1. Bundle, bodies on disk, result header."""
    from cotrr_ray.bundles.registry import BundleSource, resolve_uri

    bundle = resolve_uri(args.bundle, str(REPO))
    try:
        src = BundleSource.parse(bundle).resolve()[1]
    except Exception as e:  # noqa: BLE001 - say what to do
        raise SystemExit(
            f"no bundle at {args.bundle} ({e}); train one: "
            "flock /tmp/ray.lock python train_job.py --config configs/demo.yaml"
        ) from e
    work = Path(tempfile.mkdtemp(prefix="experiments-cost-"))
    encodings = [e for e in args.encodings.split(",") if e]
    body_files: dict[str, list[str]] = {}
    body_bytes = {}
    for enc in encodings:
        bodies = make_bodies(enc, n_bodies=args.bodies)
        body_bytes[enc] = int(statistics.mean(len(b) for b in bodies))
        d = work / f"bodies-{enc}"
        d.mkdir()
        for i, b in enumerate(bodies):
            (d / f"{i:03d}.json").write_bytes(b)
        body_files[enc] = [str(p) for p in sorted(d.iterdir())]
    result = {
        "issue": 14,
        "goal": f"throughput loss ON vs OFF <= {GOAL_MAX_LOSS:.0%}",
        **run_header(serving=True),
        "settings": {
            "order": args.order.split(","),
            "concurrency": [int(c) for c in args.concurrency.split(",")],
            "encodings": encodings,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "bodies": args.bodies,
            "body_bytes": body_bytes,
            "candidates": N_CANDIDATES,
            "top_m": TOP_M,
            "bundle": str(bundle),
            "bundle_dir": str(src),
            "serve_config": str(Path(args.serve_config).resolve()),
            "mode": args.mode,
            "serve_env": SERVE_ENV[args.mode],
            "client_requested": args.client,
            "runs_per_config": {n: args.order.split(",").count(n) for n in CONFIGS},
        },
    }
    return {"work": work, "bundle": str(src), "body_files": body_files, "result": result}


def router_cpu(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """3. The Router's own CPU per request, OFF vs ON, in this process (see the module docstring)."""
    import asyncio

    import numpy as np

    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.config import AppArgs, RoutingConfig
    from cotrr_ray.experiments.eventlog import EventLog
    from cotrr_ray.serving.coalescer import Downstream
    from cotrr_ray.serving.scorer import CalibratorCore, ScoreResult
    from cotrr_ray.serving.service import RerankService

    meta = read_meta(Path(ctx["bundle"]))
    cal = CalibratorCore()
    cal.add(ctx["bundle"])
    rng = np.random.default_rng(0)
    logits = {w: rng.standard_normal(w).astype(np.float32) for w in range(1, meta.top_m + 1)}

    async def score(cl):  # answered at once: the model's cost is not the Router's
        return ScoreResult(logits[cl.window], meta.bundle_id, ctx["bundle"])

    async def calibrate(item):
        return cal.transform(item)

    async def info(_):
        return {}

    # Exposure records go through the "ray.serve" logger, as in a replica; here into a file, as
    # Serve's replica log does (not to this terminal, whose cost no replica pays).
    serve_log = logging.getLogger("ray.serve")
    handler = logging.FileHandler(ctx["work"] / "router-cpu-serve.log")
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    serve_log.propagate = False

    def service(name: str, log_dir: Path) -> tuple[RerankService, EventLog | None]:
        routing = RoutingConfig(rollout_percentage=100, mode="interleave" if name == "ON" else "ab")
        events = EventLog(str(log_dir)) if name == "ON" else None
        app = AppArgs(bundle_uri=ctx["bundle"], routing=routing, event_log={"uri": str(log_dir) if events else None})
        svc = RerankService(meta, app, Downstream(score=score, calibrate=calibrate, info=info), events=events)
        return svc, events

    async def drive(svc: RerankService, bodies: list[bytes], n: int, concurrency: int, tag: str) -> float:
        async def one(i: int) -> None:
            await svc.rerank(bodies[i % len(bodies)], request_id=f"{tag}-{i}")

        for i in range(0, min(n, 200), concurrency):  # warm-up
            await asyncio.gather(*(one(i + j) for j in range(concurrency)))
        c0 = time.process_time()
        for i in range(0, n, concurrency):
            await asyncio.gather(*(one(i + j) for j in range(concurrency)))
        return (time.process_time() - c0) * 1000 / n

    out: dict[str, Any] = {"requests": args.router_requests, "repeats": args.router_repeats, "levels": []}
    bodies = {enc: [Path(p).read_bytes() for p in files] for enc, files in ctx["body_files"].items()}
    for enc in bodies:
        for conc in (1, 16):
            ms: dict[str, list[float]] = {n: [] for n in CONFIGS}
            for rep in range(args.router_repeats):
                for name in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
                    log_dir = ctx["work"] / f"router-cpu-{enc}-{conc}-{rep}-{name}"
                    svc, events = service(name, log_dir)
                    try:
                        ms[name].append(asyncio.run(drive(svc, bodies[enc], args.router_requests, conc, name)))
                    finally:
                        if events is not None:
                            events.close()
                    shutil.rmtree(log_dir, ignore_errors=True)
            # The least CPU time of the repeats: interference (another process on the core, its
            # cache misses) only ever adds to a run's CPU time, so the minimum is the code's own cost.
            off, on = min(ms["OFF"]), min(ms["ON"])
            row = {
                "encoding": enc,
                "concurrency": conc,
                "off_ms": round(off, 4),
                "on_ms": round(on, 4),
                "added_ms": round(on - off, 4),
                "median_off_ms": round(statistics.median(ms["OFF"]), 4),
                "median_on_ms": round(statistics.median(ms["ON"]), 4),
                "runs_ms": {n: [round(x, 4) for x in v] for n, v in ms.items()},
            }
            out["levels"].append(row)
            say(f"router cpu {enc} c={conc}: OFF {off:.3f} ms, ON {on:.3f} ms per request (+{on - off:.3f} ms)")
    serve_log.removeHandler(handler)
    handler.close()
    return out


def predicted_ratios(rows: list[dict[str, Any]], rc: dict[str, Any] | None) -> None:
    """Per Serve level: the throughput ratio ON's added Router CPU predicts, with OFF's Router ms/request."""
    if not rc:
        return
    added = {(lv["encoding"], lv["concurrency"]): lv["added_ms"] for lv in rc["levels"]}
    for r in rows:
        add = added.get((r["encoding"], 1 if r["concurrency"] == 1 else 16))  # the phase's two levels
        xs = [x["router_cores"] * 1000 / x["rps"] for x in r["runs"]["OFF"] if x.get("router_cores") and x["rps"]]
        if add is None or not xs:
            continue
        router_ms = statistics.median(xs)
        r["router_ms_off"] = round(router_ms, 3)
        r["predicted_rps_ratio"] = round(router_ms / (router_ms + add), 3)


def run_configs(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """4. Each configuration of `--order` in its own child process (a fresh local Ray + Serve)."""
    runs = []
    for i, name in enumerate(args.order.split(",")):
        if name not in CONFIGS:
            raise SystemExit(f"--order: {name!r} is not one of {CONFIGS}")
        run_dir = ctx["work"] / f"run{i}-{name}"
        run_dir.mkdir()
        spec = {
            "name": name,
            "index": i,
            "work": str(run_dir),
            "mode": args.mode,
            "num_cpus": args.num_cpus,
            "serve_config": str(Path(args.serve_config).resolve()),
            "bundle": ctx["bundle"],
            "bodies": ctx["body_files"],
            "encodings": ctx["result"]["settings"]["encodings"],
            "levels": ctx["result"]["settings"]["concurrency"],
            "warmup": args.warmup,
            "duration": args.duration,
            "client": args.client,
            "py_spy": args.py_spy,
        }
        (run_dir / "spec.json").write_text(json.dumps(spec))
        out = run_dir / "result.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        say(f"run {i}: {name} (fresh local Ray + Serve)")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_one", str(run_dir / "spec.json"), str(out)],
            env=env,
            cwd=REPO,
            timeout=args.run_timeout,
        )
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"run {i} ({name}) failed with code {proc.returncode}; logs under {run_dir}")
        runs.append(json.loads(out.read_text()))
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """5. Per (encoding, concurrency): each configuration's runs, their mean, and ON/OFF ratios."""
    keys = [(r["encoding"], r["concurrency"]) for r in runs[0]["levels"]]
    rows = []
    for enc, c in keys:
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in CONFIGS}
        for run in runs:
            for lv in run["levels"]:
                if (lv["encoding"], lv["concurrency"]) == (enc, c):
                    per[run["name"]].append(
                        {
                            "run": run["index"],
                            "rps": lv["rps"],
                            "p50_ms": lv["p50_ms"],
                            "p99_ms": lv["p99_ms"],
                            "errors": lv["errors"],
                            "fallbacks": lv["fallbacks"],
                            "loadavg": lv["loadavg"],
                            "loadavg_end": lv["loadavg_end"],
                            "foreign_cores": lv["cpu"]["foreign_cores"],
                            "server_cpu_ms_per_request": lv["server_cpu_ms_per_request"],
                            "router_cores": lv["cpu"]["per_process"].get("Router"),
                        }
                    )
        row: dict[str, Any] = {"encoding": enc, "concurrency": c, "runs": per}
        for n in CONFIGS:
            xs = per[n]
            row[n] = {
                "rps": round(statistics.mean(x["rps"] for x in xs), 1) if xs else None,
                "p50_ms": round(statistics.mean(x["p50_ms"] for x in xs), 3) if xs else None,
                "server_cpu_ms_per_request": round(statistics.mean(x["server_cpu_ms_per_request"] for x in xs), 3)
                if xs
                else None,
            }
        if row["OFF"]["rps"] and row["ON"]["rps"]:
            row["rps_ratio"] = round(row["ON"]["rps"] / row["OFF"]["rps"], 3)
            row["p50_ratio"] = round(row["ON"]["p50_ms"] / row["OFF"]["p50_ms"], 3)
            row["pair_rps_ratios"] = [
                round(on["rps"] / off["rps"], 3) for off, on in zip(per["OFF"], per["ON"], strict=False)
            ]
        rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput loss at the loaded levels (c > 1) against the goal."""
    loaded = [r for r in rows if r["concurrency"] > 1 and "rps_ratio" in r]
    if not loaded:
        return {"loaded_levels": 0}
    worst = min(loaded, key=lambda r: r["rps_ratio"])
    return {
        "loaded_levels": len(loaded),
        "worst_rps_ratio": worst["rps_ratio"],
        "worst_at": {"encoding": worst["encoding"], "concurrency": worst["concurrency"]},
        "mean_rps_ratio": round(statistics.mean(r["rps_ratio"] for r in loaded), 3),
        "goal_met": all(r["rps_ratio"] >= 1 - GOAL_MAX_LOSS for r in loaded),
    }


_COLS = (("off_rps", "OFF", "rps"), ("on_rps", "ON", "rps"), ("off_p50", "OFF", "p50_ms"), ("on_p50", "ON", "p50_ms"))


def print_table(result: dict[str, Any]) -> None:
    print()
    print(f"client: {result['client']}   order: {','.join(result['settings']['order'])}")
    print(
        f"{'enc':7} {'c':>3} | {'OFF rps':>8} {'ON rps':>8} {'ratio':>6} | {'OFF p50':>8} {'ON p50':>8} {'ratio':>6} "
        f"| per-run rps (load avg 1-min at start)"
    )
    for r in result["summary"]:
        runs = sorted([*r["runs"]["OFF"], *r["runs"]["ON"]], key=lambda x: x["run"])
        names = {x["run"]: n for n in CONFIGS for x in r["runs"][n]}
        per = "  ".join(f"{names[x['run']]} {x['rps']:.0f} ({x['loadavg'][0] if x['loadavg'] else '?'})" for x in runs)
        v = {k: (r[n][m] if r[n][m] is not None else float("nan")) for k, n, m in _COLS}
        print(
            f"{r['encoding']:7} {r['concurrency']:>3} | {v['off_rps']:>8.1f} {v['on_rps']:>8.1f} "
            f"{r.get('rps_ratio', float('nan')):>6.3f} | {v['off_p50']:>8.2f} {v['on_p50']:>8.2f} "
            f"{r.get('p50_ratio', float('nan')):>6.3f} | {per}"
        )
    print(f"verdict: {result['verdict']}")
    for lv in (result.get("router_cpu") or {}).get("levels", []):
        print(
            f"router cpu in process {lv['encoding']:7} c={lv['concurrency']:<3}: OFF {lv['off_ms']:.3f} ms, "
            f"ON {lv['on_ms']:.3f} ms per request (+{lv['added_ms']:.3f} ms; medians {lv['median_off_ms']:.3f} / "
            f"{lv['median_on_ms']:.3f})"
        )
    for r in result["summary"]:
        if "predicted_rps_ratio" in r:
            print(
                f"predicted by Router CPU {r['encoding']:7} c={r['concurrency']:<3}: ON/OFF rps "
                f"{r['predicted_rps_ratio']:.3f} (OFF Router {r['router_ms_off']:.2f} ms/request in Serve)"
            )
    for run in result["runs"]:
        if "event_log" in run:
            print(f"run {run['index']} ({run['name']}) event log: {run['event_log']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: json, c=16, OFF,ON, 1 s + 2 s per level")
    p.add_argument("--json", default=None, help="default bench/results/experiments-cost.json")
    p.add_argument("--order", default=None, help=f"configurations in run order (default {DEFAULT_ORDER})")
    p.add_argument("--concurrency", default=None, help=f"comma-separated levels (default {DEFAULT_LEVELS})")
    p.add_argument("--encodings", default=None, help="default json,base64")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per level (default 2)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 6)")
    p.add_argument("--bodies", type=int, default=N_BODIES)
    p.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    p.add_argument("--mode", choices=tuple(SERVE_ENV), default="opt", help="Serve's environment (kit.cluster)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--bundle", default="artifacts/registry/demo@production")
    p.add_argument("--serve-config", default=str(REPO / "serve_config.yaml"))
    p.add_argument(
        "--router-requests", type=int, default=None, help="requests per in-process Router CPU run (0 = skip)"
    )
    p.add_argument("--router-only", action="store_true", help="only the in-process Router CPU phase (no Ray)")
    p.add_argument("--router-repeats", type=int, default=None, help="OFF/ON alternations of the Router CPU phase")
    p.add_argument("--run-timeout", type=float, default=400.0, help="seconds per configuration run at most")
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="ENC:C:SECONDS",
        help="profile the Router with py-spy during that level of every run (e.g. base64:32:8)",
    )
    a = p.parse_args(argv)
    if a.py_spy:
        enc, c, secs = a.py_spy.split(":")
        a.py_spy = {"encoding": enc, "concurrency": int(c), "seconds": int(secs)}
    q = a.quick
    a.order = a.order or ("OFF,ON" if q else DEFAULT_ORDER)
    a.concurrency = a.concurrency or ("16" if q else DEFAULT_LEVELS)
    a.encodings = a.encodings or ("json" if q else "json,base64")
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 2.0)
    a.duration = a.duration if a.duration is not None else (2.0 if q else 6.0)
    a.router_requests = a.router_requests if a.router_requests is not None else (200 if q else 500)
    a.router_repeats = a.router_repeats if a.router_repeats is not None else (2 if q else 8)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_one":
        _one_main(argv[1:])
        return {}
    t0 = time.perf_counter()
    args = parse_args(argv)
    ctx = setup(args)
    result = ctx["result"]
    say(f"machine: {result['machine']['logical_cpus']} CPUs, load {loadavg()}; order {args.order}")
    try:
        result["router_cpu"] = router_cpu(args, ctx) if args.router_requests else None
        runs = [] if args.router_only else run_configs(args, ctx)
    finally:
        shutil.rmtree(ctx["work"], ignore_errors=True)
    result["runs"] = runs
    result["client"] = runs[0].get("client") if runs else None
    result["summary"] = summarize(runs) if runs else []
    predicted_ratios(result["summary"], result["router_cpu"])
    result["verdict"] = verdict(result["summary"])
    result["load"]["after"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    out = write_json(result, Path(args.json or REPO / "bench/results/experiments-cost.json"), indent=1, newline=True)
    say(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
