"""Closed-loop HTTP load generators and sequential Server-Timing profiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

if __package__ in (None, ""):  # run as a script (the httpx client child): bench/ on the path for `kit`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.bodies import Body  # noqa: E402
from kit.cluster import batch_counters  # noqa: E402
from kit.machine import INHERITED_LABELS, CpuMeter, loadavg, remeasure_while_noisy, say  # noqa: E402

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
        proc, client_cpu_s = _run_child(cmd, timeout_s=duration_s + 60)
        m = re.search(r"WRK_JSON (\{.*\})", proc.stdout)
        if proc.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        w = json.loads(m.group(1))
        ms = {k: w[f"{k}_us"] / 1000 for k in ("p50", "p95", "p99", "mean", "max")}
        counts = {
            "requests": w["requests"],
            "non200": w["non200"],
            "s503": w["s503"],
            "retry_after": w["retry_after"],
            "socket_errors": w["connect"] + w["read"] + w["write"] + w["timeout"],
            "fallbacks": w["fallbacks"],
        }
        return _level_row(counts, w["duration_us"] / 1e6, ms, client_cpu_s)

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
        proc, client_cpu_s = _run_child(cmd, timeout_s=duration_s + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"httpx client failed: {proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        lat = np.asarray(res.pop("latencies_ms") or [0.0])
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        ms = {"p50": p50, "p95": p95, "p99": p99, "mean": lat.mean(), "max": lat.max()}
        return _level_row(res, res["duration_s"], {k: float(v) for k, v in ms.items()}, client_cpu_s)


def _run_child(cmd: list[str], *, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run the client process; its CPU seconds from the children's rusage (it exits before any snapshot)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _level_row(c: dict[str, Any], dur: float, ms: dict[str, float], client_cpu_s: float) -> dict[str, Any]:
    """One measured level, the same fields whichever client ran it."""
    return {
        "requests": c["requests"],
        "duration_s": round(dur, 3),
        "rps": round(c["requests"] / dur, 2),
        **{f"{k}_ms": round(ms[k], 3) for k in ("p50", "p95", "p99", "mean", "max")},
        "errors": c["non200"] + c["socket_errors"],
        "status_503": c["s503"],
        "retry_after": c["retry_after"],
        "socket_errors": c["socket_errors"],
        "fallbacks": c["fallbacks"],
        "client_cpu_s": round(client_cpu_s, 3),
    }


def _split_url(url: str) -> tuple[str, str]:
    m = re.match(r"(https?://[^/]+)(/.*)?$", url)
    if not m:
        raise ValueError(url)
    return m.group(1), m.group(2) or "/"


def _httpx_client_main(argv: list[str]) -> None:
    """Child process: closed loop with `concurrency` asyncio workers for `duration_s` (httpx)."""
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


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


@dataclass
class Rec:
    t: float  # start, seconds since the generator started
    latency_ms: float
    status: int  # -1 = transport error
    fallback: str | None = None
    calibrated: bool | None = None
    arm: str | None = None
    model_version: str | None = None
    problem: str | None = None  # contract violation (check_response) or error text


class RecordingLoadGen:
    """Closed-loop HTTP load: `concurrency` asyncio workers, each sending the next body as soon as
    its previous request is answered. Runs in a background thread; `set_concurrency` ramps it."""

    def __init__(
        self,
        url: str,
        bodies: list[Body],
        *,
        concurrency: int,
        max_concurrency: int | None = None,
        total: int | None = None,
        path: str = "/v1/rerank",
        timeout_s: float = 30.0,
        check: Callable[[Any, Body], str | None] | None = None,
    ) -> None:
        self.check = check or type(self).check_response
        self.url, self.bodies, self.path, self.timeout_s = url, bodies, path, timeout_s
        self.concurrency = concurrency
        self.max_concurrency = max(max_concurrency or concurrency, concurrency)
        self.total = total
        self.records: list[Rec] = []
        self._issued = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    @staticmethod
    def check_response(out: Any, body: Body) -> str | None:
        """What is wrong with a 200 response (None: nothing); subclasses or `check` put the contract here."""
        return None

    def start(self) -> RecordingLoadGen:
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def set_concurrency(self, c: int) -> None:
        self.concurrency = min(c, self.max_concurrency)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self) -> list[Rec]:
        self._stop.set()
        return self.join()

    def join(self, timeout_s: float | None = None) -> list[Rec]:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.records

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    async def _main(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.max_concurrency)))

    async def _worker(self, client: Any, i: int) -> None:
        headers = {"content-type": "application/json"}
        while not self._stop.is_set():
            if i >= self.concurrency:
                await asyncio.sleep(0.05)
                continue
            if self.total is not None and self._issued >= self.total:
                return
            k = self._issued
            self._issued += 1
            body = self.bodies[k % len(self.bodies)]
            t = time.perf_counter()
            try:
                r = await client.post(self.path, content=body.raw, headers=headers)
            except Exception as e:  # noqa: BLE001 - a transport failure is a failed request, recorded
                self.records.append(Rec(t - self.t0, (time.perf_counter() - t) * 1000, -1, problem=repr(e)[:300]))
                continue
            latency_ms = (time.perf_counter() - t) * 1000
            rec = Rec(t - self.t0, latency_ms, r.status_code)
            if r.status_code == 200:
                try:
                    out = orjson.loads(r.content)
                except orjson.JSONDecodeError:
                    out = None
                rec.problem = self.check(out, body)
                if isinstance(out, dict):
                    rec.fallback, rec.calibrated = out.get("fallback"), out.get("calibrated")
                    rec.arm, rec.model_version = out.get("arm"), out.get("model_version")
            else:
                rec.problem = f"HTTP {r.status_code}: {r.text[:200]}"
            self.records.append(rec)


def summarize(records: list[Rec], t_from: float = 0.0, t_to: float = float("inf")) -> dict[str, Any]:
    """Counts and latency of the records that started in [t_from, t_to)."""
    rs = [r for r in records if t_from <= r.t < t_to]
    ok = [r for r in rs if r.status == 200]
    lat = [r.latency_ms for r in ok]
    span = (max(r.t + r.latency_ms / 1000 for r in rs) - min(r.t for r in rs)) if rs else 0.0
    return {
        "requests": len(rs),
        "ok_200": len(ok),
        "failed": len(rs) - len(ok),
        "status": dict(Counter(r.status for r in rs)),
        "contract_violations": sum(r.problem is not None and r.status == 200 for r in rs),
        "fallbacks": dict(Counter(r.fallback for r in ok if r.fallback)),
        "uncalibrated": sum(r.fallback is None and r.calibrated is False and r.model_version is not None for r in ok),
        "throughput_rps": round(len(rs) / span, 1) if span > 0 else None,
        "latency_ms": {
            "p50": pct(lat, 50),
            "p95": pct(lat, 95),
            "p99": pct(lat, 99),
            "max": round(max(lat), 1) if lat else None,
        },
        "problems": sorted({r.problem for r in rs if r.problem})[:5],
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--_httpx-client"]:
    _httpx_client_main(sys.argv[2:])


@dataclass
class Bench:
    args: argparse.Namespace
    meter: CpuMeter = field(default_factory=CpuMeter)
    max_foreign: float | None = None  # cores used by processes not ours above which a level is re-measured
    max_wait_s: float = 180.0  # per level, waiting for the box to calm down before giving up (then flagged)
    wait_budget_s: float = 900.0  # the whole run's waiting, at most
    # A level whose load generator used more cores than this is flagged `client_over_budget`: on a
    # small box the client's CPU is taken from the servers (the httpx client halves every figure).
    max_client_cores: float | None = 0.1

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
        row, retries = remeasure_while_noisy(
            lambda: self._level(gen, url, concurrency, **measure),
            lambda r: r["cpu"]["foreign_cores"],
            meter=self.meter,
            max_foreign=self.max_foreign,
            deadline=t_end,
            note=lambda f: say(
                f"  level c={concurrency}: {f:.2f} cores used by other processes; "
                "waiting for the box to calm down, then measuring again"
            ),
        )
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
        # "server" = the processes of the server under test (the others idle meanwhile): a peer's
        # group ("peer", "peer1"), or Serve's processes without the peers'
        per = cpu["per_process"]
        if server in INHERITED_LABELS:
            cpu["server_cores"] = round(per.get(server, 0.0), 3)
        else:
            cpu["server_cores"] = round(cpu["server_cores"] - sum(per.get(k, 0.0) for k in INHERITED_LABELS), 3)
        out = {
            "concurrency": concurrency,
            **{k: v for k, v in res.items() if k != "client_cpu_s"},
            "cpu": cpu,
            "server_cpu_ms_per_request": round(
                cpu["server_cores"] * (s1["t"] - s0["t"]) / max(1, res["requests"]) * 1000, 3
            ),
            "loadavg": la0,
            "client": gen.kind,
        }
        if self.max_client_cores is not None and cpu["client_cores"] > self.max_client_cores:
            out["client_over_budget"] = True
            say(
                f"  WARNING: the load generator ({gen.kind}) used {cpu['client_cores']:.3f} cores at c={concurrency}, "
                f"more than {self.max_client_cores}: this level's figures are not comparable"
            )
        if b0 is not None and b1 is not None:
            ds, dc = b1[0] - b0[0], b1[1] - b0[1]
            out["scorer_batch_mean"] = round(ds / dc, 2) if dc > 0 else None
            out["scorer_batches"] = int(dc)
        return out
