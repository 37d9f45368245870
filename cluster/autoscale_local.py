#!/usr/bin/env python
"""Serve replica autoscaling driving Ray's node autoscaler, on one machine.

    python cluster/autoscale_local.py [--quick] [--json OUT] [--png OUT] [--bundle DIR_OR_URI]

What it does:
1. trains a small real bundle (`train_job.py --config configs/demo.yaml`, local mode, a few seconds)
   unless --bundle names one;
2. starts a head node (`ray start --head --block`, its own free ports, temp dir and auth token, never
   `ray stop`) with `--autoscaling-config` = a fake-multinode autoscaler config derived from
   `cluster/cluster.yaml` (`fake_cluster_config`): the same node types, `max_workers`, per-type
   min/max and `upscaling_speed`; the head has `CPU: 0` as there; the GPU worker type keeps its name
   and its `GPU: 1` becomes the custom resource `accelerator: 1` (so nothing tries CUDA). Worker
   nodes are real raylets on this host, launched and terminated by Ray's own autoscaler (the v1
   `StandardAutoscaler` in the head's monitor process, with `FakeMultiNodeProvider`); this script
   never adds or removes a node;
3. deploys `serve_config.yaml` (`local_serve_config`) with the Scorer's `num_gpus: 1` (what the
   GPU cluster sets) replaced by `resources: {accelerator: 1}`: one Scorer replica per worker node,
   as one GPU per node gives on the cluster; `Scorer.max_replicas` (4) = `gpu_worker.max_workers` (4);
4. ramps closed-loop HTTP load, stops it, and waits until the autoscaler has removed the nodes it
   added; samples every second: replicas per deployment (and per node), nodes per type, the
   autoscaler's pending launches and pending resource demands, latency and failures;
5. writes bench/results/autoscale-local.json (+ .png) and tears down exactly its own processes.

The local overrides (`LocalOverrides`; everything else is the shipped files):
- worker nodes have 2 logical CPUs (cluster: 4) and a 256 MiB object store: each fake node is a real
  raylet with its agents on this 2-core box;
- `idle_timeout_minutes` 0.5 (cluster: 10) and Serve `downscale_delay_s` 20 s (shipped: 300 s) so
  that scale-down fits in a run;
- Scorer `target_ongoing_requests` 0.25 (shipped: 2): one Router replica keeps at most
  `coalesce_max_in_flight` = 2 calls out to the Scorer, and on this box their average stays near 1,
  so with the shipped target the Scorer never wants a second replica here (on a GPU cluster several
  Router replicas feed it);
- `proxy_location: HeadOnly` and HTTP on 127.0.0.1:<free port>: all fake nodes share one host, where
  per-node proxies would share the port (SO_REUSEPORT) and a terminated node would cut the
  connections the kernel gave its proxy; on a cloud cluster a load balancer over EveryNode proxies
  does that job.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

from kit.bodies import Body, synthetic_bodies  # noqa: E402
from kit.cluster import app_config, free_port, replica_states, wait_for  # noqa: E402
from kit.contract import LoadGen  # noqa: E402
from kit.load import summarize  # noqa: E402
from kit.machine import basic_machine, loadavg, say  # noqa: E402
from kit.report import Report, save_figure, write_json  # noqa: E402

CLUSTER_YAML = REPO / "cluster" / "cluster.yaml"
SERVE_CONFIG = REPO / "serve_config.yaml"
APP = "rerank"
DEPLOYMENTS = ("Router", "Scorer", "Calibrator")
# FakeMultiNodeProvider tags the head with this type name and its fixed node id (ray/autoscaler/
# _private/fake_multi_node/node_provider.py); `ray start --head` takes that id when RAY_FAKE_CLUSTER=1.
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
ACCELERATOR = "accelerator"  # the custom resource that stands in for `GPU` on the worker type


class LocalOverrides(BaseModel):
    """Everything that differs from cluster/cluster.yaml and serve_config.yaml in the local run."""

    model_config = ConfigDict(extra="forbid")

    worker_num_cpus: float = Field(2, gt=0, description="logical CPUs per worker node (cluster.yaml: 4)")
    object_store_bytes: int = Field(256 * 1024**2, ge=80 * 1024**2, description="object store per node")
    idle_timeout_minutes: float = Field(0.5, gt=0, description="cluster.yaml: 10")
    serve_downscale_delay_s: float = Field(20, ge=0, description="every deployment; serve_config.yaml: 300")
    scorer_target_ongoing_requests: float = Field(0.25, gt=0, description="serve_config.yaml: 2")
    accelerator_resource: str = ACCELERATOR


class Ramp(BaseModel):
    """The load: closed-loop concurrency steps, then nothing until the added nodes are gone."""

    model_config = ConfigDict(extra="forbid")

    steps: list[tuple[int, float]] = [(1, 30), (4, 40), (12, 40)]
    hold_until: Literal["max", "above_min"] = "max"
    hold_s: float = Field(60, ge=0, description="the last step lasts also until the Scorer is at `hold_until`, at most")
    scale_down_timeout_s: float = Field(300, gt=0)


QUICK = Ramp(steps=[(1, 10), (8, 30)], hold_until="above_min", hold_s=60, scale_down_timeout_s=240)


# --------------------------------------------------------------------------------- configs


def load_launcher_config(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def local_resources(resources: dict[str, float], o: LocalOverrides) -> dict[str, float]:
    """A node type's resources on the fake cluster: `GPU` becomes the custom accelerator resource,
    a worker's CPUs are scaled down; a head's `CPU: 0` stays 0."""
    out: dict[str, float] = {}
    for key, value in resources.items():
        if key == "GPU":
            out[o.accelerator_resource] = value
        elif key == "CPU":
            out["CPU"] = o.worker_num_cpus if value > 0 else 0
        else:
            out[key] = value
    return out


def fake_cluster_config(launcher: dict[str, Any], o: LocalOverrides, gcs_address: str) -> dict[str, Any]:
    """The autoscaler config of the local cluster, from cluster.yaml: node types, their min/max workers
    and labels, `max_workers` and `upscaling_speed` as written there; the provider is Ray's fake
    multi-node one (worker nodes are raylets on this host), the idle timeout and the resources are
    `o`'s. The head type must be called `ray.head.default`: the fake provider tags the head so."""
    head_name = launcher["head_node_type"]
    types: dict[str, Any] = {}
    for name, t in launcher["available_node_types"].items():
        res = local_resources(t.get("resources", {}), o)
        if name == head_name:
            types[FAKE_HEAD_NODE_TYPE] = {"resources": res, "node_config": {}, "max_workers": 0}
            continue
        types[name] = {
            # the fake provider hands `object_store_memory` to the raylet as its object store size
            "resources": {**res, "object_store_memory": o.object_store_bytes},
            "node_config": {},
            "min_workers": t.get("min_workers", 0),
            "max_workers": t["max_workers"],
            "labels": dict(t.get("labels", {})),
        }
    return {
        "cluster_name": f"{launcher['cluster_name']}-local",
        "max_workers": launcher["max_workers"],
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": o.idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,  # several raylets share one IP; the autoscaler keys nodes by id
            "disable_node_updaters": True,  # nothing to ssh into: the provider starts the raylet itself
            "disable_launch_config_check": True,
            # "Launching 3 nodes" starts 3, as a cloud provider's one create call would (the fake
            # provider's default starts one per call, whatever the count)
            "launch_multiple": True,
            "gcs_address": gcs_address,  # else the provider assumes <host ip>:6379, maybe someone else's
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def worker_type(launcher: dict[str, Any]) -> str:
    """The worker node type that carries the GPU (the Scorer's) in cluster.yaml."""
    (name,) = [
        n
        for n, t in launcher["available_node_types"].items()
        if n != launcher["head_node_type"] and "GPU" in t["resources"]
    ]
    return name


def local_serve_config(*, http_port: int, bundle: str, top_m: int | None, o: LocalOverrides) -> dict[str, Any]:
    """serve_config.yaml for the local autoscaling cluster. Differences (tests/test_autoscale_local.py
    pins the list): HTTP on 127.0.0.1:<port>, proxy_location HeadOnly, the bundle path (and the Router's
    top_m when the bundle's is smaller), every deployment's downscale_delay_s, the Scorer's
    target_ongoing_requests, and the Scorer's `num_gpus` line replaced by `resources: {accelerator: 1}`."""
    shipped = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"]
    shipped_top_m = next(d for d in shipped if d["name"] == "Router")["user_config"]["top_m"]
    cfg = app_config(http_port=http_port, bundle=bundle, top_m=top_m if top_m and top_m < shipped_top_m else None)
    cfg["proxy_location"] = "HeadOnly"
    app = cfg["applications"][0]
    deps = {d["name"]: d for d in app["deployments"]}
    for d in deps.values():
        if "autoscaling_config" in d:
            d["autoscaling_config"]["downscale_delay_s"] = o.serve_downscale_delay_s
    scorer = deps["Scorer"]
    scorer["autoscaling_config"]["target_ongoing_requests"] = o.scorer_target_ongoing_requests
    opts = scorer["ray_actor_options"]
    opts.pop("num_gpus", None)
    opts["resources"] = {o.accelerator_resource: 1}
    return cfg


# ------------------------------------------------------------------------------- the cluster


class LocalAutoscalingCluster:
    """A head node with the fake-multinode autoscaler; ours alone (own ports, temp dir, token).

    Not `ray.cluster_utils.AutoscalingCluster`: its start() and shutdown() run `ray stop --force`,
    which kills every Ray process of the user on the host (the colleagues' test clusters too)."""

    def __init__(self, autoscaler_cfg_fn, launcher: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        self.tmp = Path(tempfile.mkdtemp(prefix="cotrr-as-", dir="/tmp"))  # short: Unix socket paths
        self.gcs_port = free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.config_path = workdir / "autoscaler.yaml"
        self.config = autoscaler_cfg_fn(self.gcs)
        self.launcher = launcher
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "head.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        token = self.tmp / "auth_token"
        if not token.exists():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        env.update(
            RAY_FAKE_CLUSTER="1",  # FakeMultiNodeProvider refuses to run without it
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_USAGE_STATS_ENABLED="0",
            # a terminated fake node stops at once instead of asking the GCS to drain it for 30 s
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # every process of every node imports this worktree's package, not an installed copy
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            OMP_NUM_THREADS="1",
            # the sampler reads per-replica counters and the controller's gauges from Prometheus
            RAY_metrics_report_interval_ms="2000",
        )
        return env

    def start(self, timeout_s: float = 120) -> float:
        t0 = time.perf_counter()
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        head = self.config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]
        labels = self.launcher["available_node_types"][self.launcher["head_node_type"]].get("labels", {})
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--temp-dir",
            str(self.tmp),
            "--num-cpus",
            str(int(head.get("CPU", 0))),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(self.config["available_node_types"][worker_type(self.launcher)]["resources"]["object_store_memory"]),
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            f"--autoscaling-config={self.config_path}",
        ]
        if labels:
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("RAY_AUTH")})
        # its own session (process group): the head, the monitor and every node it launches are in it
        self.proc = subprocess.Popen(
            cmd, env=self.env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"head exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"head not up after {timeout_s} s")
            time.sleep(0.5)
        return time.perf_counter() - t0

    def connect(self) -> None:
        import ray

        ray.init(address=self.gcs, log_to_driver=False, namespace="autoscale-local")

    def monitor_lines(self) -> list[str]:
        """The autoscaler's own account of its launches and terminations (monitor.log of the head)."""
        out = []
        for f in sorted((self.tmp / "session_latest" / "logs").glob("monitor*")):
            out += [ln for ln in f.read_text(errors="replace").splitlines() if AUTOSCALER_EVENT.search(ln)]
        return out

    def shutdown(self) -> None:
        """Driver off, then SIGTERM to the head's process group, SIGKILL to what is left of it, then to
        any process whose command line names this run's temp dir (unique to this run)."""
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.proc is not None:
            pgid = self.proc.pid
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and _group_alive(pgid):
                    time.sleep(0.5)
                if not _group_alive(pgid):
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        for pid in _pids_naming(str(self.tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


# the monitor's launch/termination lines ("NodeLauncher0: Launching 1 nodes", ":event_summary:Adding 1
# node(s) of type gpu_worker.", "Removing 1 nodes of type gpu_worker (idle).", "StandardAutoscaler:
# ...: Terminating ... (idle)"), not its periodic "non-terminated nodes" line
AUTOSCALER_EVENT = re.compile(r"Launching \d+ nodes|Adding \d+ node|Removing \d+ node|Terminating|\(idle\)")


SERVE_GAUGE = re.compile(r"ray_serve_autoscaling_(total_requests|desired_replicas|target_replicas)\{")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids_naming(needle: str) -> list[int]:
    me = os.getpid()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        with contextlib.suppress(OSError):
            if needle in (p / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(p.name))
    return out


# ------------------------------------------------------------------------------ observation


class Sampler:
    """Once a second: nodes per type, the autoscaler's pending launches and resource demands, replicas
    per deployment and where they run, and each Scorer replica's windows scored (its Prometheus
    counter on its node's metrics agent)."""

    def __init__(self, t0: float, worker_type_name: str, accelerator: str) -> None:
        self.t0 = t0
        self.worker_type = worker_type_name
        self.accelerator = accelerator
        self.rows: list[dict[str, Any]] = []
        self.nodes_seen: dict[str, dict[str, Any]] = {}  # node id -> {type, up_s, down_s}
        self.replicas_seen: dict[str, dict[str, Any]] = {}  # replica id -> {deployment, node, first, last, state}
        self.scored: dict[str, float] = {}  # Scorer replica id -> windows scored (max seen)
        self.serve_autoscaling: dict[str, dict[str, float]] = {}  # deployment -> controller's latest gauges
        self.concurrency = lambda: 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            t = self.now()
            try:
                self.rows.append(self.sample(t, details=k % 2 == 0, scrape=k % 3 == 0))
            except Exception as e:  # noqa: BLE001 - one failed sample is reported, not fatal
                self.rows.append({"t": round(t, 1), "error": repr(e)[:200]})
            k += 1
            self._stop.wait(max(0.0, 1.0 - (self.now() - t)))

    def node_type(self, node: dict[str, Any]) -> str:
        if node["NodeID"] == FAKE_HEAD_NODE_ID:
            return "head"
        return self.worker_type if self.accelerator in node["Resources"] else "other"

    def sample(self, t: float, *, details: bool, scrape: bool) -> dict[str, Any]:
        import ray
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        alive = [n for n in ray.nodes() if n["Alive"]]
        for n in ray.nodes():
            s = self.nodes_seen.setdefault(n["NodeID"], {"type": self.node_type(n), "up_s": round(t, 1)})
            if not n["Alive"] and "down_s" not in s:
                s["down_s"] = round(t, 1)
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        status = json.loads(raw) if raw else {}
        lm, ar = status.get("load_metrics_report") or {}, status.get("autoscaler_report") or {}
        if scrape:
            self._scrape(alive)
        row = {
            "t": round(t, 1),
            "concurrency": self.concurrency(),
            "nodes": dict(Counter(self.node_type(n) for n in alive)),
            "replicas": replica_states(APP),
            "pending_launches": ar.get("pending_launches") or {},
            "pending_nodes": len(ar.get("pending_nodes") or []),
            "resource_demand": [[d, c] for d, c in (lm.get("resource_demand") or [])],
            "autoscaler_status_age_s": round(time.time() - status["time"], 1) if status.get("time") else None,
            "serve_autoscaling": copy.deepcopy(self.serve_autoscaling),
        }
        if details:
            self._replica_details(t)
        return row

    def _replica_details(self, t: float) -> None:
        import ray
        from ray import serve

        client = serve.context._get_global_client()
        details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=10)
        app = (details.get("applications") or {}).get(APP) or {}
        for dep, d in (app.get("deployments") or {}).items():
            for r in d.get("replicas") or []:
                s = self.replicas_seen.setdefault(
                    r["replica_id"], {"deployment": dep, "node_id": r.get("node_id"), "first_s": round(t, 1)}
                )
                s.update(node_id=r.get("node_id") or s["node_id"], last_s=round(t, 1), state=r.get("state"))
                if r.get("state") == "RUNNING" and "running_s" not in s:
                    s["running_s"] = round(t, 1)

    def _scrape(self, alive: list[dict[str, Any]]) -> None:
        from kit.cluster import http_get

        for n in alive:
            port = n.get("MetricsExportPort")
            if not port:
                continue
            status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=3)
            if status != 200:
                continue
            for line in body.decode(errors="replace").splitlines():
                if line.startswith("ray_cotrr_scorer_lists_total{") and 'deployment="Scorer"' in line:
                    m = re.search(r'replica="([^"]+)"', line)
                    if m:
                        self.scored[m.group(1)] = max(self.scored.get(m.group(1), 0.0), float(line.rsplit(" ", 1)[1]))
                # the controller's view (head node): the ongoing requests it averaged and what it wants
                m = SERVE_GAUGE.match(line)
                if m and f'application="{APP}"' in line:
                    dep = re.search(r'deployment="([^"]+)"', line)
                    if dep:
                        self.serve_autoscaling.setdefault(dep.group(1), {})[m.group(1)] = float(line.rsplit(" ", 1)[1])


# ----------------------------------------------------------------------------------- the run


def train_bundle(workdir: Path) -> Path:
    """A real bundle from train_job.py (configs/demo.yaml shrunk; local mode, no cluster)."""
    out = workdir / "registry" / "demo"
    cmd = [
        sys.executable,
        str(REPO / "train_job.py"),
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--output",
        str(out),
        "--alias",
        "production",
        "scaling.num_workers=0",
        "data.generate.queries=300",
        "optim.max_epochs=2",
        "model.d_model=64",
        f"data.cache_dir={workdir / 'data'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("bundle ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"train_job.py failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
    from cotrr_ray.bundles.registry import BundleSource

    return BundleSource.parse(f"{out}@production").resolve()[1]


def make_bodies(top_m: int) -> list[Body]:
    return synthetic_bodies(n_bodies=32, n_candidates=40, top_m=top_m, seed=30_000, query_prefix="as-q")


def deploy(cfg: dict[str, Any]) -> Any:
    """What `serve deploy` does: start Serve with the file's HTTP options and proxy location, submit it."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    return client


def app_running() -> bool:
    from ray import serve

    st = serve.status().applications.get(APP)
    if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        raise RuntimeError(f"deploy failed: {st.message}")
    return st is not None and st.status == "RUNNING"


def running(dep: str) -> int:
    return replica_states(APP).get(dep, {}).get("RUNNING", 0)


def worker_nodes(sampler: Sampler) -> list[str]:
    # a copy: the sampler thread adds nodes while the main thread reads
    seen = list(sampler.nodes_seen.items())
    return [nid for nid, s in seen if s["type"] == sampler.worker_type and "down_s" not in s]


def run(
    *,
    overrides: LocalOverrides,
    ramp: Ramp,
    workdir: Path,
    bundle: str | None = None,
    launcher_path: Path = CLUSTER_YAML,
) -> Report:
    from cotrr_ray.bundles.bundle import read_meta

    rep = Report("autoscale-local")
    t_wall = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    T0 = time.perf_counter()
    launcher = load_launcher_config(launcher_path)
    wtype = worker_type(launcher)
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.perf_counter() - T0, 1)
        say(f"t={marks[name]:6.1f} s  {name}")

    if bundle is None:
        bundle_dir = train_bundle(workdir)
    else:
        from cotrr_ray.bundles.registry import BundleSource

        bundle_dir = BundleSource.parse(bundle).resolve()[1]
    mark("bundle ready")
    top_m = read_meta(bundle_dir).top_m
    http_port = free_port()
    serve_cfg = local_serve_config(http_port=http_port, bundle=str(bundle_dir), top_m=top_m, o=overrides)
    cluster = LocalAutoscalingCluster(lambda gcs: fake_cluster_config(launcher, overrides, gcs), launcher, workdir)
    (workdir / "serve_config.local.yaml").write_text(yaml.safe_dump(serve_cfg, sort_keys=False))
    sampler = Sampler(T0, wtype, overrides.accelerator_resource)
    gen = None
    try:
        cluster.start()
        mark("head node up")
        cluster.connect()
        sampler.start()
        deploy(serve_cfg)
        mark("serve config submitted (no worker node yet)")
        wait_for(app_running, 300, 1.0, "app RUNNING")
        mark("app RUNNING")
        url = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: _healthy(url), 60, 0.5, "/healthz 200")
        nodes_at_start = worker_nodes(sampler)
        say(f"  worker nodes: {len(nodes_at_start)}; replicas {replica_states(APP)}")

        scorer_as = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "Scorer")[
            "autoscaling_config"
        ]
        router = next(d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == "Router")
        bodies = make_bodies(router["user_config"]["top_m"])
        gen = LoadGen(url, bodies, concurrency=0, max_concurrency=max(c for c, _ in ramp.steps))
        gen.start()
        load_t0 = gen.t0 - T0
        sampler.concurrency = lambda: gen.concurrency
        mark("load start")
        phases = []
        for k, (c, seconds) in enumerate(ramp.steps):
            gen.set_concurrency(c)
            t = time.perf_counter() - T0
            say(f"  concurrency {c} for {seconds} s")
            time.sleep(seconds)
            if k == len(ramp.steps) - 1:
                goal = scorer_as["max_replicas"] if ramp.hold_until == "max" else scorer_as["min_replicas"] + 1
                deadline = time.monotonic() + ramp.hold_s
                while time.monotonic() < deadline and running("Scorer") < goal:
                    time.sleep(1.0)
                time.sleep(5.0)  # a few seconds with the new replicas serving
            phases.append({"concurrency": c, "from_s": round(t, 1), "to_s": round(time.perf_counter() - T0, 1)})
        gen.set_concurrency(0)
        gen.stop()
        mark("load stop")

        def scaled_down() -> bool:
            added = [n for n in worker_nodes(sampler) if n not in nodes_at_start]
            return (
                running("Scorer") == scorer_as["min_replicas"]
                and not added
                and len(worker_nodes(sampler)) <= len(nodes_at_start)
            )

        with contextlib.suppress(TimeoutError):
            wait_for(scaled_down, ramp.scale_down_timeout_s, 1.0, "scale-down of replicas and nodes")
        mark("scale-down end" if scaled_down() else "scale-down timeout")
        time.sleep(2)
        monitor = cluster.monitor_lines()
    finally:
        sampler.stop()
        if gen is not None and not gen.done:
            gen.stop()
        cluster.shutdown()
        mark("teardown done")

    records = gen.records if gen is not None else []
    for r in records:  # request times on the script's clock
        r.t += load_t0
    rep.data.update(
        started_utc=t_wall,
        machine={**basic_machine(), "loadavg_end": loadavg()},
        overrides=overrides.model_dump(),
        ramp=ramp.model_dump(),
        autoscaler_config={
            k: v
            for k, v in cluster.config.items()
            if k in ("max_workers", "upscaling_speed", "idle_timeout_minutes", "available_node_types")
        },
        serve_autoscaling={d["name"]: d.get("autoscaling_config") for d in serve_cfg["applications"][0]["deployments"]},
        marks_s=marks,
        phases=phases,
        nodes=sampler.nodes_seen,
        replicas=sampler.replicas_seen,
        scorer_windows_scored=sampler.scored,
        autoscaler_log=monitor[-60:],
        total=summarize(records),
        per_second=per_second(records, sampler.rows),
        timeline=sampler.rows,
    )
    rep.data["times_s"] = scaling_times(rep.data, nodes_at_start, wtype)
    check(rep, records, nodes_at_start, wtype, scorer_as, overrides)
    return rep


def _healthy(url: str) -> bool:
    from kit.cluster import http_get

    return http_get(url + "/healthz", timeout=5)[0] == 200


def per_second(records: list[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests started in each second: count, failures, fallbacks, p50/p99 latency; with the sampler row
    of that second (nodes, replicas, pending demand)."""
    by_s: dict[int, list[Any]] = defaultdict(list)
    for r in records:
        by_s[int(r.t)].append(r)
    row_at = {int(r["t"]): r for r in rows if "error" not in r}
    out = []
    for s in sorted(set(by_s) | set(row_at)):
        rs = by_s.get(s, [])
        lat = [r.latency_ms for r in rs if r.status == 200]
        row = row_at.get(s, {})
        out.append(
            {
                "t": s,
                "requests": len(rs),
                "failed": sum(r.status != 200 or r.problem is not None for r in rs),
                "fallbacks": sum(bool(r.fallback) for r in rs if r.status == 200),
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
                "concurrency": row.get("concurrency"),
                "nodes": row.get("nodes"),
                "running": {d: (row.get("replicas") or {}).get(d, {}).get("RUNNING", 0) for d in DEPLOYMENTS}
                if row
                else None,
                "pending_launches": row.get("pending_launches"),
                "resource_demand": row.get("resource_demand"),
            }
        )
    return out


def scaling_times(data: dict[str, Any], nodes_at_start: list[str], wtype: str) -> dict[str, Any]:
    added = {nid: s for nid, s in data["nodes"].items() if s["type"] == wtype and nid not in nodes_at_start}
    rows = [r for r in data["timeline"] if "error" not in r]
    load_stop = data["marks_s"].get("load stop")

    def first(pred, after: float = 0.0) -> float | None:
        return next((r["t"] for r in rows if r["t"] >= after and pred(r)), None)

    scorer = lambda r: (r["replicas"].get("Scorer") or {}).get("RUNNING", 0)  # noqa: E731
    max_scorers = max((scorer(r) for r in rows), default=0)
    return {
        "first_worker_node_up": min(
            (s["up_s"] for nid, s in data["nodes"].items() if s["type"] == wtype), default=None
        ),
        "first_accelerator_demand": first(lambda r: any(ACCELERATOR in d for d, _ in r["resource_demand"])),
        "first_pending_launch_under_load": first(
            lambda r: bool(r["pending_launches"]), after=data["marks_s"].get("load start", 0)
        ),
        "nodes_added_up": sorted(s["up_s"] for s in added.values()),
        "nodes_added_down": sorted(s["down_s"] for s in added.values() if "down_s" in s),
        "max_scorer_replicas": max_scorers,
        "scorer_at_peak": first(lambda r: scorer(r) == max_scorers) if max_scorers else None,
        "scorer_back_to_min": first(
            lambda r: scorer(r) == 1 and sum((r["replicas"].get("Scorer") or {}).values()) == 1, after=load_stop or 0
        ),
        "max_worker_nodes": max((r["nodes"].get(wtype, 0) for r in rows), default=0),
        "load_stop": load_stop,
    }


def check(rep: Report, records, nodes_at_start: list[str], wtype: str, scorer_as: dict, o: LocalOverrides) -> None:
    total, times, nodes = rep.data["total"], rep.data["times_s"], rep.data["nodes"]
    added = {nid: s for nid, s in nodes.items() if s["type"] == wtype and nid not in nodes_at_start}
    rep.check(
        "zero failed requests during the whole ramp",
        bool(records) and total["failed"] == 0 and total["contract_violations"] == 0,
        f"{total['requests']} requests, status {total['status']}, fallbacks {total['fallbacks']}",
    )
    rep.check(
        "Serve scaled the Scorer up under load",
        times["max_scorer_replicas"] > scorer_as["min_replicas"],
        f"max {times['max_scorer_replicas']} RUNNING (min {scorer_as['min_replicas']}, max {scorer_as['max_replicas']})",
    )
    rep.check(
        "the autoscaler launched worker nodes for the pending Scorer replicas",
        bool(added) and times["first_accelerator_demand"] is not None,
        f"{len(added)} node(s) added at t={times['nodes_added_up']} s; accelerator demand first seen at "
        f"t={times['first_accelerator_demand']} s",
    )
    placed = {
        rid: r for rid, r in rep.data["replicas"].items() if r["deployment"] == "Scorer" and r.get("node_id") in added
    }
    served = {rid: rep.data["scorer_windows_scored"].get(rid, 0) for rid in placed}
    rep.check(
        "new Scorer replicas started on the new nodes and served",
        bool(placed)
        and all(r.get("running_s") is not None for r in placed.values())
        and all(v > 0 for v in served.values()),
        f"windows scored per replica on added nodes: {served}",
    )
    idle_s = o.idle_timeout_minutes * 60
    gone = [s for s in added.values() if "down_s" in s]
    rep.check(
        "after the load stopped, every added node was terminated (idle timeout)",
        bool(added) and len(gone) == len(added) and times["scorer_back_to_min"] is not None,
        f"Scorer back to {scorer_as['min_replicas']} at t={times['scorer_back_to_min']} s; nodes down at "
        f"t={times['nodes_added_down']} s (load stopped t={times['load_stop']} s, idle timeout {idle_s:.0f} s)",
    )
    terminations = [ln for ln in rep.data["autoscaler_log"] if re.search(r"Removing \d+ node|Terminating", ln)]
    rep.check(
        "the terminations were the autoscaler's (its monitor log), not this script's",
        len(terminations) > 0,
        terminations[-1][-200:] if terminations else "no termination in the monitor log",
    )


# ------------------------------------------------------------------------------------ report


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["timeline"] if "error" not in r]
    ps = result["per_second"]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    t = [r["t"] for r in rows]
    wtype = next((s["type"] for s in result["nodes"].values() if s["type"] not in ("head", "other")), "worker")
    ax0.step(t, [r["nodes"].get(wtype, 0) for r in rows], where="post", lw=2.2, color="black", label=f"{wtype} nodes")
    ax0.step(
        t,
        [sum(r["pending_launches"].values()) for r in rows],
        where="post",
        lw=1,
        ls=":",
        color="gray",
        label="pending launches",
    )
    for dep, color in zip(DEPLOYMENTS, ("tab:blue", "tab:orange", "tab:green")):
        ax0.step(
            t,
            [(r["replicas"].get(dep) or {}).get("RUNNING", 0) for r in rows],
            where="post",
            color=color,
            label=f"{dep} RUNNING",
        )
    ax0.set_ylabel("count")
    ax0b = ax0.twinx()
    ax0b.plot(t, [r["concurrency"] for r in rows], color="tab:red", alpha=0.35, lw=1)
    ax0b.set_ylabel("client concurrency", color="tab:red")
    ax0.legend(fontsize=7, loc="upper left")
    ax0.grid(alpha=0.3)
    sec = [p for p in ps if p["requests"]]
    ax1.plot([p["t"] for p in sec], [p["p50_ms"] for p in sec], color="tab:blue", label="p50")
    ax1.plot([p["t"] for p in sec], [p["p99_ms"] for p in sec], color="tab:purple", label="p99")
    fails = [p for p in sec if p["failed"]]
    if fails:
        ax1.scatter(
            [p["t"] for p in fails], [p["p99_ms"] or 1 for p in fails], color="red", marker="x", label="failures"
        )
    ax1.set_yscale("log")
    ax1.set_ylabel("latency of the requests started in each second (ms)", fontsize=8)
    ax1b = ax1.twinx()
    ax1b.plot([p["t"] for p in sec], [p["requests"] for p in sec], color="gray", alpha=0.4, lw=0.8)
    ax1b.set_ylabel("requests started per second", color="gray")
    ax1.set_xlabel("seconds since start")
    ax1.grid(alpha=0.3)
    for name, x in result["marks_s"].items():
        if name in ("serve config submitted (no worker node yet)", "load start", "load stop", "scale-down end"):
            for ax in (ax0, ax1):
                ax.axvline(x, color="gray", lw=0.8, ls="--")
            ax1.text(x, ax1.get_ylim()[0], " " + name.split(" (")[0], fontsize=7, rotation=90, va="bottom", ha="right")
    ax1.legend(fontsize=7, loc="upper right")
    tot = result["total"]
    save_figure(
        fig,
        path,
        f"Serve autoscaling driving the node autoscaler (fake multi-node, one host) — {tot['requests']} requests, "
        f"{tot['failed']} failed — {result['started_utc']}",
    )


def print_summary(rep: Report) -> None:
    d = rep.data
    say(f"marks (s): {d['marks_s']}")
    say(f"times (s): {d['times_s']}")
    for nid, s in sorted(d["nodes"].items(), key=lambda x: x[1]["up_s"]):
        say(f"  node {nid[-5:]} {s['type']:<11} up {s['up_s']:>6} s  down {s.get('down_s', '-')}")
    say(f"  {'t':>4} {'c':>3} {'req':>4} {'fail':>4} {'p50':>7} {'p99':>7} nodes running pending demand")
    for p in d["per_second"][::5]:
        say(
            f"  {p['t']:>4} {p['concurrency']!s:>3} {p['requests']:>4} {p['failed']:>4} {p['p50_ms']!s:>7} {p['p99_ms']!s:>7} "
            f"{p['nodes']} {p['running']} {p['pending_launches']} {p['resource_demand']}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the reduced ramp (the test's)")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "autoscale-local.json"))
    p.add_argument("--png", default=None, help="default: the JSON path with .png")
    p.add_argument("--bundle", default=None, help="a bundle dir or registry URI (default: train one)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, generated configs)")
    p.add_argument("--replot", action="store_true", help="only redraw --png from an existing --json")
    a = p.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.json).read_text()), Path(a.png) if a.png else Path(a.json).with_suffix(".png"))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="autoscale-local-"))
    rep = run(overrides=LocalOverrides(), ramp=QUICK if a.quick else Ramp(), workdir=workdir, bundle=a.bundle)
    print_summary(rep)
    result = rep.to_dict()
    out = write_json(result, Path(a.json), indent=1)
    png = Path(a.png) if a.png else out.with_suffix(".png")
    plot(result, png)
    say(f"wrote {out} and {png}; work dir {workdir}")
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    say("PASS" if rep.passed else "FAIL")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
