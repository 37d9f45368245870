"""The physical limit of serving: the bare in-process pipeline, batched like the Scorer, no HTTP, no Ray."""

from __future__ import annotations

import time

import orjson


def run_limit(bundle_uri: str, bodies: list[bytes], *, batch_size: int, duration_s: float, top_m: int = 20) -> dict:
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
