"""The physical limit of serving: the bare in-process pipeline, batched like the Scorer, no HTTP, no Ray."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import orjson


def run_limit(
    bundle_uri: str,
    bodies: list[bytes],
    *,
    batch_size: int,
    duration_s: float,
    top_m: int = 20,
    on_ready: Callable[[], None] | None = None,
) -> dict:
    """The bare pipeline in a loop, one thread: parse+validate+features for `batch_size` requests,
    one model call for the batch (as the Scorer's @serve.batch does), then calibrate, order and
    serialise each. Per-stage milliseconds per request are reported too. `on_ready` is called after
    the warm-up, just before measuring (several processes start together)."""
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
        probs = [cal.transform(CalibrationInput(s.model_version, s.bundle_uri, s.logits)) for s in results]
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
    if on_ready is not None:
        on_ready()
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


def run_limit_processes(
    bundle_uri: str,
    bodies: list[bytes],
    *,
    batch_size: int,
    duration_s: float,
    top_m: int = 20,
    cpus: list[int] | None = None,
    timeout_s: float = 300.0,
) -> dict:
    """The limit on several cores: one `run_limit` process per CPU in `cpus` (default: every CPU),
    each pinned to its own CPU with one torch thread, all measuring over the same window; their
    throughputs summed. The processes load and warm up first, then start together on a signal."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    cpus = list(range(os.cpu_count() or 1)) if cpus is None else list(cpus)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-limit-"))
    files = []
    for i, b in enumerate(bodies):
        f = work / f"body{i:03d}.json"
        f.write_bytes(b)
        files.append(str(f))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])
    procs = []
    try:
        for cpu in cpus:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", bundle_uri, str(batch_size)]
            cmd += [str(duration_s), str(top_m), str(cpu), *files]
            procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=repo)
            )
        for p in procs:  # every process loaded and warmed up before any measures
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"limit process failed to start: {line!r}")
        for p in procs:
            p.stdin.write("GO\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"limit process exited {p.returncode}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            Path(f).unlink(missing_ok=True)
        work.rmdir()
    return {
        "rps": round(sum(o["rps"] for o in outs), 2),
        "processes": len(outs),
        "cpus": cpus,
        "batch_size": batch_size,
        "by_process": outs,
    }


def _child_main(argv: list[str]) -> None:
    """One process of `run_limit_processes`: pin, load, READY, wait for GO, measure, print JSON."""
    import json
    import os
    import sys
    from pathlib import Path

    bundle_uri, batch_size, duration_s, top_m, cpu = argv[0], int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4])
    bodies = [Path(p).read_bytes() for p in argv[5:]]
    os.sched_setaffinity(0, {cpu})

    def on_ready() -> None:
        print("READY", flush=True)
        sys.stdin.readline()

    out = run_limit(bundle_uri, bodies, batch_size=batch_size, duration_s=duration_s, top_m=top_m, on_ready=on_ready)
    out["cpu"] = cpu
    print(json.dumps(out), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--_child"]:
    _child_main(sys.argv[2:])
