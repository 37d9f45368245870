#!/usr/bin/env python
"""Feedback ingestion benchmark: how many acknowledged (fsync'ed) events per second.

    python bench/events_bench.py [--seconds 5] [--json bench/results/events.json] [--skip-http]

Phases:
1. log: `EventLog.append` from C threads at once, each waiting for its ack (batch of B events
   per append), on local disk, for `--seconds`: events/s, appends/s, commits (fsyncs)/s and the
   commit latency (enqueue to fsync) p50/p99.
2. decisions: `EventLog.append_nowait` of one decision-sized record (~100 displayed items) at a
   paced rate (a Router answering R requests/s), nothing waited for: commits/s and the commit
   latency of the oldest buffered record, p50/p99/max. That latency is the decision-record loss
   window on a kill (at most about `commit_interval_s` + one fsync).
3. http: `POST /v1/feedback` through a fresh local Ray Serve (Router + fused Scorer,
   event_log on local disk) from C client threads, batches of B: acknowledged events/s end to end
   (HTTP, parse and validation, dedupe, group commit). The client threads share the box's CPUs.

Run under `flock /tmp/ray.lock` on a shared machine (phase 2 starts Ray).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.bundles import prepare_bundle  # noqa: E402
from kit.cluster import free_port  # noqa: E402
from kit.machine import machine_info, say  # noqa: E402

from cotrr_ray.experiments.eventlog import EventLog  # noqa: E402
from cotrr_ray.experiments.events import feedback_record  # noqa: E402


def events(prefix: str, n: int, now: float) -> list[dict]:
    return [
        {
            "event_id": f"{prefix}-{i}",
            "request_id": f"r-{i % 97}",
            "item_id": f"i{i % 10}",
            "type": "click",
            "timestamp": now,
            "value": None,
        }
        for i in range(n)
    ]


def run_threads(threads: int, seconds: float, work) -> tuple[int, float]:
    """Run `work(thread_index, stop) -> events acked` on `threads` threads for `seconds`."""
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            counts[t] = work(t, stop)
        except BaseException as e:  # re-raised below: a failed client must not read as 0 events/s
            errors.append(e)
            stop.set()

    ts = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for th in ts:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in ts:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts), time.perf_counter() - t0


def phase_log(threads: int, batch: int, seconds: float, workdir: Path) -> dict:
    commits_ms: list[float] = []
    log = EventLog(str(workdir / f"log-{threads}-{batch}"), on_commit=lambda k, n, ms: commits_ms.append(ms))

    def work(t: int, stop: threading.Event) -> int:
        n = 0
        while not stop.is_set():
            now = time.time()
            recs = [feedback_record(e, received_at=now, replica="bench") for e in events(f"{t}-{n}", batch, now)]
            log.append("feedback", recs).result()
            n += batch
        return n

    acked, wall = run_threads(threads, seconds, work)
    log.close()
    ms = np.array(commits_ms)
    return {
        "phase": "log",
        "threads": threads,
        "batch": batch,
        "events_per_s": round(acked / wall),
        "appends_per_s": round(acked / batch / wall),
        "commits_per_s": round(log.stats.commits / wall),
        "commit_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "commit_ms_p99": round(float(np.percentile(ms, 99)), 3),
    }


def decision_record(i: int) -> dict:
    n = 100  # the serve bench's list length; columns as `events.Displayed` writes them
    items = {
        "item_id": [f"c{j}" for j in range(n)],
        "upstream_index": list(range(n)),
        "score": [0.5] * 20 + [None] * (n - 20),
        "probability": [0.5] * 20 + [None] * (n - 20),
        "propensity": [1.0] * n,
        "team": None,
        "competitive": None,
    }
    return {"kind": "decision", "request_id": f"r-{i}", "unit_id": f"u{i % 1000}", "ts": time.time(), "items": items}


def phase_decisions(rate: float, seconds: float, workdir: Path, commit_interval_s: float = 0.2) -> dict:
    lat: list[float] = []
    log = EventLog(
        str(workdir / f"decisions-{rate:g}"),
        commit_interval_s=commit_interval_s,
        on_commit=lambda k, n, ms: lat.append(ms),
    )
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        due = int(elapsed * rate)  # paced like a Router's responses, not a tight loop
        while n < due:
            log.append_nowait("decision", [decision_record(n)])
            n += 1
        time.sleep(0.001)
    wall = time.perf_counter() - t0
    log.close()
    ms = np.array(lat)
    return {
        "phase": "decisions",
        "rate_per_s": rate,
        "commit_interval_s": commit_interval_s,
        "records": n,
        "commits_per_s": round(log.stats.commits / wall, 1),
        "commit_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "commit_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "commit_ms_max": round(float(ms.max()), 3),
    }


def phase_http(configs: list[tuple[int, int]], seconds: float, workdir: Path) -> list[dict]:
    import httpx
    import orjson
    import ray
    from ray import serve

    from cotrr_ray.config import AppArgs
    from cotrr_ray.serving.app import build_app

    bundle = prepare_bundle(None, workdir)
    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        args = AppArgs(bundle_uri=str(bundle), fused_calibration=True, event_log={"uri": str(workdir / "http-log")})
        serve.run(build_app(args), name="ev", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/feedback"
        for threads, batch in configs:

            def work(t: int, stop: threading.Event, batch=batch, threads=threads) -> int:
                acked, run = 0, uuid.uuid4().hex[:8]  # fresh ids every run: no batch is a duplicate
                with httpx.Client(timeout=30) as c:
                    for n in itertools.count():
                        if stop.is_set():
                            break
                        body = orjson.dumps({"events": events(f"{run}-{t}-{n}", batch, time.time())})
                        r = c.post(url, content=body, headers={"content-type": "application/json"})
                        if r.status_code != 200 or r.json()["duplicates"]:
                            raise RuntimeError(f"{r.status_code}: {r.text}")
                        acked += r.json()["accepted"]
                return acked

            run_threads(threads, 1.0, work)  # warm-up (connections, replica)
            acked, wall = run_threads(threads, seconds, work)
            rows.append(
                {
                    "phase": "http",
                    "threads": threads,
                    "batch": batch,
                    "events_per_s": round(acked / wall),
                    "requests_per_s": round(acked / batch / wall, 1),
                }
            )
            say(f"http threads={threads} batch={batch}: {rows[-1]['events_per_s']} events/s")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip-http", action="store_true")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="events-bench-") as tmp:
        work = Path(tmp)
        for threads, batch in [(1, 1), (16, 1), (1, 100), (16, 10), (16, 100)]:
            rows.append(phase_log(threads, batch, a.seconds, work))
            say(f"log threads={threads} batch={batch}: {rows[-1]}")
        for rate in (100.0, 500.0):
            rows.append(phase_decisions(rate, a.seconds, work))
            say(f"decisions rate={rate:g}/s: {rows[-1]}")
        if not a.skip_http:
            rows += phase_http([(1, 1), (8, 1), (8, 10), (8, 100)], a.seconds, work)
    result = {"machine": machine_info(), "seconds": a.seconds, "rows": rows}
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
