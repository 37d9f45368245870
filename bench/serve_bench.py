#!/usr/bin/env python
"""Serving benchmark: cotrr-ray on Ray Serve against the physical limit and the peer a user would pick.

    python bench/serve_bench.py [--quick] [--json OUT] [--png OUT]

In one run, on the same cores:

1. **limit**: the bare in-process pipeline (validate -> features -> model -> calibrate -> order ->
   serialise) called in a loop, batched like the Scorer batches (max_batch_size from
   serve_config.yaml), one torch thread, no HTTP and no Ray;
2. **cotrr-ray**: serve_config.yaml deployed through Serve's config path (what `serve run
   serve_config.yaml` does: `serve_start(http_options, proxy_location)` + `deploy_apps(config)`) on a
   fresh local Ray (`ray.init(address="local")`, never someone else's cluster), driven by a
   closed-loop HTTP load generator at concurrency 1, 4, 16, 32, 64 with JSON-float and base64
   bodies; plus an overload level past the shipped admission limits (expect fast 503s with
   Retry-After), the documented fused mode (calibration inside the Scorer) and a scale-out check
   (two Scorer replicas pinned to separate CPUs vs one); and a **per-stage profile** at concurrency 1
   (`--profile`): sequential requests whose `Server-Timing` headers (read, parse, score, model,
   calibrate, total) split the latency of the graph, the fused mode and the peer into stages;
3. **peer**: bench/peer_app.py (FastAPI + uvicorn, same bundle and the same parsing / scoring /
   calibration / ordering code), driven by the same load generator. The fair peer is what a user
   benchmarking this box would run: uvicorn with one worker per core (`--peer-workers`, default the
   CPU count); the one-worker figure is measured beside it (`--no-peer1` leaves it out). The ratios
   (`ratios.<encoding>.rps_vs_peer`, `p50_vs_peer`) are against the fair peer.

The limit is measured on one core (in this process) and on every core (`--limit-cores`, default the
CPU count: one pinned process per core, throughputs summed), so each side has its own bound.

Request: 100 candidates in upstream order, the first 20 with every feature group of the bundle's
spec (dims of the default image-search spec), the rest ids only; 32 distinct bodies (fixed seed)
sent round-robin. The load generator is `wrk` (1 thread, Lua script; `apt-get install -y wrk`), a
prerequisite: without it the run stops, unless `--client httpx` asks for the asyncio + httpx client,
which uses ~0.4 cores of a 2-core box and so takes them from the servers. Every level records the
client's CPU; a level where it used more than `--max-client-cores` (default 0.1) is flagged
(`client_over_budget`, result["client"], and a warning in the printed report).

Serve's processes get their environment from the process that starts Ray (here, this script):
`--mode opt` (default) sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1, so the Router replica serves HTTP on
its own port (direct ingress) and the load goes there; `--mode default` leaves Serve's defaults
and loads the proxy. Every table row records the box load (/proc/loadavg) and CPU use.
No timed assertions anywhere: this prints and writes numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

from kit.bodies import ENCODINGS, synthetic_bodies  # noqa: E402
from kit.cluster import (  # noqa: E402
    SERVE_ENV,
    ServeCluster,
    free_port,
    probe_hops,
    serve_config_for_bench,
    wait_healthy,
)
from kit.limit import run_limit, run_limit_processes  # noqa: E402
from kit.load import Bench, LoadGen, _httpx_client_main, profile_server  # noqa: E402
from kit.machine import CpuMeter, loadavg, machine_info, say  # noqa: E402
from kit.report import (  # noqa: E402
    bench_parser,
    best,
    print_report,
    ratios,
    targets,
    write_outputs,
)
from kit.report import plot_serve as plot  # noqa: E402

DEFAULT_LEVELS = (1, 4, 16, 32, 64)
QUICK_LEVELS = (1, 16, 64)
N_CANDIDATES = 100
TOP_M = 20
N_BODIES = 32


def make_bodies(
    encoding: str, *, n_bodies: int = N_BODIES, n_candidates: int = N_CANDIDATES, top_m: int = TOP_M, seed: int = 0
) -> list[bytes]:
    """`n_bodies` distinct rerank requests (`kit.bodies.synthetic_bodies`, one generator per body):
    JSON float lists for "json", base64 little-endian float32 for "base64"."""
    bodies = synthetic_bodies(
        n_bodies=n_bodies,
        n_candidates=n_candidates,
        top_m=top_m,
        seed=seed,
        encoding=encoding,
        per_body_seed=True,
        query_prefix="bench-q",
        unit_prefix="bench-user-",
    )
    return [b.raw for b in bodies]


# ============================================================================ the limit (no HTTP, no Ray)


# ============================================================================ measuring


# ============================================================================ the run: a recipe of phases


@dataclass
class Peer:
    """One peer server: `workers` uvicorn processes behind `url`; `label` is its CPU group."""

    label: str
    workers: int
    proc: subprocess.Popen
    log: Any
    url: str


@dataclass
class ServeRun:
    """What the phases of one run share: settings, bodies, load generators, servers, the result."""

    args: argparse.Namespace
    bundle_uri: Any
    meta: Any
    serve_cfg_path: Path
    scfg: dict[str, Any]
    levels: list[int]
    encodings: list[str]
    bodies: dict[str, list[bytes]]
    result: dict[str, Any]
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="serve-bench-run-")))
    gens: dict[str, LoadGen] = field(default_factory=dict)
    bench: Bench | None = None
    cluster: ServeCluster | None = None
    http_port: int = 0
    peers: dict[str, Peer] = field(default_factory=dict)  # "peer" (fair: one worker per core), "peer1"

    @property
    def peer(self) -> Peer | None:
        return self.peers.get("peer")

    @property
    def first(self) -> str:
        return self.encodings[0]

    def deployment(self, name: str) -> dict[str, Any]:
        return next(d for d in self.scfg["applications"][0]["deployments"] if d["name"] == name)

    def serve_config(self, variant: str = "default") -> dict[str, Any]:
        return serve_config_for_bench(
            self.serve_cfg_path, http_port=self.http_port, bundle_uri=str(self.bundle_uri), variant=variant
        )

    def measure(self, enc: str, c: int) -> dict[str, Any]:
        """One level of the Serve app (through the cluster's ingress), batch sizes scraped."""
        r = self.bench.level(
            self.gens[enc],
            self.cluster.url_base + "/v1/rerank",
            c,
            warmup_s=self.args.warmup,
            duration_s=self.args.duration,
            scrape=self.cluster.scrape,
        )
        r["encoding"] = enc
        return r

    def serve_level(self, name: str, enc: str, c: int) -> dict[str, Any]:
        r = self.measure(enc, c)
        say(
            f"{name} {enc} c={c}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.1f} "
            f"err {r['errors']} fb {r['fallbacks']} batch {r.get('scorer_batch_mean')} "
            f"foreign {r['cpu']['foreign_cores']} cpu {r['cpu']['per_process']}"
        )
        return r

    def peer_level(self, peer: Peer, enc: str, c: int) -> dict[str, Any]:
        r = self.bench.level(
            self.gens[enc],
            peer.url + "/v1/rerank",
            c,
            warmup_s=self.args.warmup,
            duration_s=self.args.duration,
            server=peer.label,
        )
        r["encoding"] = enc
        r["workers"] = peer.workers
        say(
            f"{peer.label} ({peer.workers} worker{'s' if peer.workers > 1 else ''}) {enc} c={c}: {r['rps']:.1f} "
            f"req/s p50 {r['p50_ms']:.2f} ms err {r['errors']} cpu {r['cpu']['server_cores']} "
            f"client {r['cpu']['client_cores']} foreign {r['cpu']['foreign_cores']}"
        )
        return r

    def sweep(self, name: str, lv: list[int]) -> list[dict[str, Any]]:
        return [self.serve_level(name, enc, c) for enc in self.encodings for c in lv]

    def profile(self, name: str, base: str) -> None:
        """The per-stage profile of one server at c=1, every encoding (result["profile"])."""
        prof = self.result.setdefault(
            "profile", {"requests": self.args.profile_requests, "encoding": self.first, "by_encoding": {}}
        )
        for enc in self.encodings:
            s0 = self.bench.meter.snapshot()
            p = profile_server(base + "/v1/rerank", self.bodies[enc], self.args.profile_requests)
            p["foreign_cores"] = CpuMeter.delta(s0, self.bench.meter.snapshot())["foreign_cores"]
            p["loadavg"] = loadavg()
            prof["by_encoding"].setdefault(enc, {})[name] = p
            if enc == self.first:
                prof[name] = p
            m = p["median_ms"]
            say(
                f"profile {name} {enc}: client {m['client']} total {m['total']} parse {m['parse']} "
                f"score {m['score']} model {m['model']} calibrate {m['calibrate']} "
                f"(errors {p['errors']}, fallbacks {p['fallbacks']}, foreign {p['foreign_cores']})"
            )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe: limit first (nothing else running), then the peer and Serve side by side, then the
    Serve-only phases (overload, hop floor, fused, ablation, scale-out), then ratios and targets."""
    t_start = time.perf_counter()
    run = setup_run(args)
    measure_limit(run)
    start_load_generators(run)
    try:
        start_peer(run)
        start_serve(run)
        measure_peer_and_serve(run)
        measure_overload(run)
        measure_hop_floor(run)
        measure_fused(run)
        measure_ablation(run)
        measure_scaleout(run)
    finally:
        teardown(run)
    summarize_run(run.result)
    run.result["load"]["after"] = loadavg()
    run.result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return run.result


def setup_run(args: argparse.Namespace) -> ServeRun:
    """Bundle, serve_config.yaml, request bodies and the result's header (machine, settings)."""
    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.bundles.registry import BundleSource, resolve_uri

    bundle_uri = resolve_uri(args.bundle, str(REPO))
    meta = read_meta(BundleSource.parse(bundle_uri).resolve()[1])
    serve_cfg_path = Path(args.serve_config).resolve()
    scfg = yaml.safe_load(serve_cfg_path.read_text())
    encodings = [e for e in args.encodings.split(",") if e]
    bodies = {enc: make_bodies(enc, n_bodies=args.bodies) for enc in encodings}
    run = ServeRun(
        args,
        bundle_uri,
        meta,
        serve_cfg_path,
        scfg,
        [int(x) for x in args.concurrency.split(",")],
        encodings,
        bodies,
        {},
    )
    run.result.update(
        machine=machine_info(serving=True),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        load={"before": loadavg()},
        settings=run_settings(run),
    )
    say(f"machine: {run.result['machine']['logical_cpus']} CPUs, load {loadavg()}")
    return run


def scorer_batch_size(run: ServeRun) -> int:
    return int(run.deployment("Scorer").get("user_config", {}).get("max_batch_size", 16))


def run_settings(run: ServeRun) -> dict[str, Any]:
    args = run.args
    return {
        "mode": args.mode,
        "serve_env": SERVE_ENV[args.mode],
        "concurrency": run.levels,
        "encodings": run.encodings,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "bodies": args.bodies,
        "body_bytes": {enc: int(statistics.mean(len(b) for b in run.bodies[enc])) for enc in run.encodings},
        "candidates": N_CANDIDATES,
        "top_m": TOP_M,
        "bundle": str(run.bundle_uri),
        "bundle_id": run.meta.bundle_id,
        "spec": run.meta.spec.describe(),
        "scorer_max_batch_size": scorer_batch_size(run),
        "serve_config": str(run.serve_cfg_path),
        "client": None,
    }


def measure_limit(run: ServeRun) -> None:
    """1. The in-process limit, before anything else runs."""
    limit_by = {}
    for enc in run.encodings:
        limit_by[enc] = run_limit(
            run.bundle_uri,
            run.bodies[enc],
            batch_size=scorer_batch_size(run),
            duration_s=run.args.limit_duration,
            top_m=min(TOP_M, run.meta.top_m),
        )
        limit_by[enc]["loadavg"] = loadavg()
        say(
            f"limit {enc}: {limit_by[enc]['rps']:.1f} req/s, {limit_by[enc]['ms_per_request']:.3f} ms/req "
            f"{limit_by[enc]['stages_ms_per_request']}"
        )
    run.result["limit"] = {
        "rps": limit_by[run.first]["rps"],
        "ms_per_request": limit_by[run.first]["ms_per_request"],
        "encoding": run.first,
        "by_encoding": limit_by,
    }
    if run.args.limit_cores > 1:
        multi = {}
        for enc in run.encodings:
            multi[enc] = run_limit_processes(
                str(run.bundle_uri),
                run.bodies[enc],
                batch_size=scorer_batch_size(run),
                duration_s=run.args.limit_duration,
                top_m=min(TOP_M, run.meta.top_m),
                cpus=list(range(run.args.limit_cores)),
            )
            multi[enc]["loadavg"] = loadavg()
            say(f"limit {enc} on {run.args.limit_cores} cores: {multi[enc]['rps']:.1f} req/s (summed over processes)")
        run.result["limit"]["multi_core"] = {"cores": run.args.limit_cores, "by_encoding": multi}


def client_kind(requested: str) -> str:
    """The load generator to use: wrk unless asked otherwise; refuses `auto` without wrk (the httpx
    fallback costs the servers ~0.4 cores of a 2-core box and would halve every figure)."""
    if requested == "auto":
        if shutil.which("wrk") is None:
            raise SystemExit(
                "serve_bench: wrk not found. It is a prerequisite (apt-get install -y wrk); "
                "--client httpx runs the Python client instead, and its CPU is flagged in the result"
            )
        return "wrk"
    return requested


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).split("\n")[0].strip() or None


def start_load_generators(run: ServeRun) -> None:
    kind = client_kind(run.args.client)
    run.gens = {enc: LoadGen(run.bodies[enc], kind=kind) for enc in run.encodings}
    run.result["settings"]["client"] = kind
    run.result["client"] = {
        "kind": kind,
        "version": wrk_version() if kind == "wrk" else "httpx (asyncio, one child process)",
        "max_cores_allowed": run.args.max_client_cores,
    }
    run.bench = Bench(run.args, max_foreign=run.args.max_foreign, max_client_cores=run.args.max_client_cores)


def peer_settings(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(label, workers) of the peers to run: the fair one first, then the one-worker one."""
    if args.no_peer:
        return []
    out = [("peer", args.peer_workers)]
    if args.peer1 and args.peer_workers != 1:
        out.append(("peer1", 1))
    return out


def start_peer(run: ServeRun) -> None:
    """bench/peer_app.py servers (one torch thread per worker), unless --no-peer: the fair peer
    (`--peer-workers` uvicorn workers) and the one-worker peer beside it."""
    for label, workers in peer_settings(run.args):
        port = free_port()
        log = open(run.work / f"{label}.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench/peer_app.py"),
                "--bundle",
                str(run.bundle_uri),
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--serve-config",
                str(run.serve_cfg_path),
                "--exposure-log",
                str(run.work / f"{label}-exposure.jsonl"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=REPO,
        )
        run.bench.meter.labels[proc.pid] = label  # its workers inherit the label (kit.machine)
        run.peers[label] = Peer(label, workers, proc, log, f"http://127.0.0.1:{port}")
    run.result["peer_workers"] = run.args.peer_workers if run.peers else None


def stop_peer(run: ServeRun) -> None:
    for peer in run.peers.values():
        if peer.proc.poll() is None:
            peer.proc.send_signal(signal.SIGTERM)  # uvicorn's supervisor stops its workers
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.proc.wait(timeout=20)
            if peer.proc.poll() is None:
                peer.proc.kill()
        if not peer.log.closed:
            peer.log.close()


def start_serve(run: ServeRun) -> None:
    """A fresh local Ray, serve_config.yaml deployed, both servers healthy; Serve's idle CPU."""
    args, result = run.args, run.result
    run.cluster = cluster = ServeCluster(
        mode=args.mode, num_cpus=args.num_cpus, metrics_port=free_port(), log_dir=run.work
    )
    cluster.start()
    run.http_port = free_port()
    deploy_s = cluster.deploy(run.serve_config())
    result["startup_s"] = {"ray_init": round(cluster.ray_start_s, 2), "deploy_to_healthy": round(deploy_s, 2)}
    say(
        f"Serve up: ray.init {cluster.ray_start_s:.1f} s, deploy->healthy {deploy_s:.1f} s, "
        f"target {cluster.url_base} (direct ingress: {cluster.ingress_port is not None})"
    )
    result["settings"]["target"] = "router replica port (direct ingress)" if cluster.ingress_port else "proxy"
    for peer in run.peers.values():
        wait_healthy(peer.url, 180, peer.proc)
    a = run.bench.meter.snapshot()
    time.sleep(3)
    idle = CpuMeter.delta(a, run.bench.meter.snapshot())
    result["serve_idle_cores"] = round(
        sum(v for k, v in idle["per_process"].items() if k not in ("bench-driver", *run.peers)), 3
    )
    say(f"idle: Serve's processes {result['serve_idle_cores']} cores, box {idle['box_cores']} cores")


def measure_peer_and_serve(run: ServeRun) -> None:
    """2. Peers and Ray Serve, interleaved: each (encoding, concurrency) level is measured for the fair
    peer, the one-worker peer and then the service, back to back, so all see the same background load
    on a shared box (the idle cost of the other servers during a level is reported as
    serve_idle_cores). Then the profiles (the fair peer and the graph)."""
    rows: list[dict[str, Any]] = []
    peer_rows: dict[str, list[dict[str, Any]]] = {label: [] for label in run.peers}
    try:
        for enc in run.encodings:
            for c in run.levels:
                for label, peer in run.peers.items():
                    peer_rows[label].append(run.peer_level(peer, enc, c))
                rows.append(run.serve_level("serve", enc, c))
        if run.args.profile:  # all servers are up: the default graph and the fair peer, back to back
            if run.peer is not None:
                run.profile("peer", run.peer.url)
            run.profile("graph", run.cluster.url_base)
    finally:
        stop_peer(run)
    run.result["levels"] = rows
    for label, peer in run.peers.items():
        run.result[label] = {"workers": peer.workers, "levels": peer_rows[label]}


def measure_overload(run: ServeRun) -> None:
    """Past the Router's admission limit (max_ongoing + max_queued per replica): fast 503s expected."""
    if run.args.no_overload:
        return
    router = run.deployment("Router")
    cap = int(router.get("max_ongoing_requests", 5)) + int(router.get("max_queued_requests", -1))
    c_over = max(cap + 64, 128)
    r = run.bench.level(
        run.gens[run.first],
        run.cluster.url_base + "/v1/rerank",
        c_over,
        warmup_s=min(1.0, run.args.warmup),
        duration_s=max(1.0, run.args.duration / 2),
        scrape=run.cluster.scrape,
    )
    r["encoding"] = run.first
    r["router_admission_cap"] = cap
    run.result["overload"] = r
    say(
        f"overload c={c_over} (cap {cap}): {r['rps']:.1f} req/s, 503 {r['status_503']}, "
        f"retry-after {r['retry_after']}, other errors {r['errors'] - r['status_503']}, p99 {r['p99_ms']:.1f}"
    )


def measure_hop_floor(run: ServeRun) -> None:
    if run.args.hop_probe:
        run.result["hop_probe"] = {**probe_hops(f"http://127.0.0.1:{run.cluster.http_port}"), "loadavg": loadavg()}
        say(f"Serve hop floor (replica -> replica, c=1): {run.result['hop_probe']}")


def measure_fused(run: ServeRun) -> None:
    """Fused mode: calibration inside the Scorer."""
    if not run.args.fused:
        return
    run.cluster.deploy(run.serve_config("fused"), fresh=True)
    fl = [c for c in run.levels if c != 4] or run.levels
    run.result["fused"] = {"levels": run.sweep("fused", fl)}
    if run.args.profile:
        run.profile("fused", run.cluster.url_base)


def measure_ablation(run: ServeRun) -> None:
    """The same graph without router-side coalescing (one hop per request and deployment)."""
    if not run.args.ablation:
        return
    run.cluster.deploy(run.serve_config("nocoalesce"), fresh=True)
    levels = run.result["levels"]
    al = sorted({1, *[best(levels, e)["concurrency"] for e in run.encodings if best(levels, e)]})
    run.result["no_coalescing"] = {"levels": run.sweep("no-coalescing", al)}


def measure_scaleout(run: ServeRun) -> None:
    """Two Scorer replicas, each pinned to its own CPU, vs one (at the one-replica best concurrency)."""
    if not run.args.scaleout:
        return
    one = {enc: best(run.result["levels"], enc) for enc in run.encodings}
    run.cluster.deploy(run.serve_config("scaleout2"), fresh=True)
    pinned = pin_scorer_replicas(run.cluster)
    rows = []
    for enc in run.encodings:
        c = one[enc]["concurrency"] if one[enc] else 32
        r = run.measure(enc, c)
        r["one_replica_rps"] = one[enc]["rps"] if one[enc] else None
        r["ratio_2_vs_1"] = round(r["rps"] / one[enc]["rps"], 3) if one[enc] else None
        rows.append(r)
        say(
            f"scale-out {enc} c={c}: 2 replicas {r['rps']:.1f} req/s vs 1 replica "
            f"{r['one_replica_rps']} -> {r['ratio_2_vs_1']}  cpu {r['cpu']['per_process']}"
        )
    run.result["scaleout"] = {
        "scorer_replicas": 2,
        "pinned_cpus": pinned,
        "levels": rows,
        "ratio_2_vs_1": {r["encoding"]: r["ratio_2_vs_1"] for r in rows},
    }


def pin_scorer_replicas(cluster: ServeCluster) -> dict[int, int]:
    """Wait (60 s at most) for two Scorer replica processes and pin each to its own CPU."""
    deadline = time.monotonic() + 60
    while len(cluster.replica_pids("Scorer")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    ncpu = os.cpu_count() or 1
    pinned = {}
    for i, pid in enumerate(cluster.replica_pids("Scorer")):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {i % ncpu})
            pinned[pid] = i % ncpu
    return pinned


def teardown(run: ServeRun) -> None:
    stop_peer(run)  # a no-op unless a phase before the interleaved levels failed
    if run.cluster is not None:
        run.cluster.shutdown()
    shutil.rmtree(run.work, ignore_errors=True)
    for g in run.gens.values():
        shutil.rmtree(g.workdir, ignore_errors=True)


def summarize_run(result: dict[str, Any]) -> None:
    """Noisy/re-measured level counts, the load generator's CPU, ratios and targets."""
    all_rows = [*result.get("levels", [])]
    for key in ("peer", "peer1", "fused", "no_coalescing", "scaleout"):
        all_rows += result.get(key, {}).get("levels", [])
    result["noisy_levels"] = sum(1 for r in all_rows if r.get("noisy"))
    result["retried_levels"] = sum(1 for r in all_rows if r.get("retries"))
    summarize_client(result, all_rows)
    result["ratios"] = ratios(
        result.get("levels", []),
        result.get("peer", {}).get("levels", []),
        result["limit"]["by_encoding"],
        peer1=result.get("peer1", {}).get("levels", []),
        limit_multi=result["limit"].get("multi_core", {}).get("by_encoding"),
    )
    result["targets"] = targets(result)


def summarize_client(result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """result["client"]: the load generator, the most cores it used in a level, and whether every
    level stayed within `max_cores_allowed` (`ok`; false means the figures are not comparable)."""
    client = result.setdefault("client", {"kind": result.get("settings", {}).get("client")})
    used = [r["cpu"]["client_cores"] for r in rows if "cpu" in r and "client_cores" in r["cpu"]]
    client["max_cores_used"] = max(used) if used else None
    client["over_budget_levels"] = sum(1 for r in rows if r.get("client_over_budget"))
    client["ok"] = client["over_budget_levels"] == 0


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        quick="~2 minutes: c=1,16,64, short levels, no fused/scale-out",
        json="write the result here (default bench/results/serve.json)",
        png="plot (default: the JSON path with .png)",
    )
    p.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,4,16,32,64)")
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per level (default 2; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 8; quick 3)")
    p.add_argument("--limit-duration", type=float, default=None, help="seconds of the in-process limit loop")
    p.add_argument("--bodies", type=int, default=N_BODIES)
    p.add_argument(
        "--client",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="load generator; auto = wrk, and stop if it is not installed (apt-get install -y wrk)",
    )
    p.add_argument(
        "--max-client-cores",
        type=float,
        default=0.1,
        help="flag a level (client_over_budget, result['client'], a warning) whose load generator used more cores",
    )
    p.add_argument(
        "--peer-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="uvicorn workers of the fair peer (default: one per core)",
    )
    p.add_argument(
        "--peer1",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the one-worker peer beside the fair one",
    )
    p.add_argument(
        "--limit-cores",
        type=int,
        default=os.cpu_count() or 1,
        help="also measure the limit on this many cores (one pinned process each, summed); <= 1: one core only",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="re-measure a level when processes that are not ours used more cores than this during it "
        "(shared machines); waits up to 3 min per level, then keeps it flagged noisy. <0: off",
    )
    p.add_argument(
        "--mode",
        choices=tuple(SERVE_ENV),
        default="opt",
        help="environment of Serve's processes: opt = RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress)",
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the local Ray")
    p.add_argument("--bundle", default="artifacts/registry/demo@production")
    p.add_argument("--serve-config", default=str(REPO / "serve_config.yaml"))
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-overload", action="store_true")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--scaleout", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the graph without router-side coalescing (c=1 and the best concurrency)",
    )
    p.add_argument(
        "--hop-probe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the round trip of a bare Serve handle call (explains the c=1 latency)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-stage latency profile at c=1 (Server-Timing) of the graph, the fused mode and the peer",
    )
    p.add_argument("--profile-requests", type=int, default=300, help="sequential requests per server and encoding")
    a = p.parse_args(argv)
    q = a.quick
    a.concurrency = a.concurrency or ",".join(map(str, QUICK_LEVELS if q else DEFAULT_LEVELS))
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 2.0)
    a.duration = a.duration if a.duration is not None else (3.0 if q else 8.0)
    a.limit_duration = a.limit_duration if a.limit_duration is not None else (2.0 if q else 5.0)
    a.fused = (not q) if a.fused is None else a.fused
    a.scaleout = (not q) if a.scaleout is None else a.scaleout
    a.hop_probe = (not q) if a.hop_probe is None else a.hop_probe
    a.ablation = (not q) if a.ablation is None else a.ablation
    a.profile = (not q) if a.profile is None else a.profile
    a.max_foreign = None if a.max_foreign is not None and a.max_foreign < 0 else a.max_foreign
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_httpx-client":
        _httpx_client_main(argv[1:])
        return {}
    args = parse_args(argv)
    result = run_benchmark(args)
    print_report(result)
    write_outputs(result, args.json or REPO / "bench/results/serve.json", args.png, plot)
    return result


if __name__ == "__main__":
    main()
