#!/usr/bin/env python
"""Router CPU microbenchmark: the Router's own Python work per request, piece by piece, without Ray.

    python bench/router_cpu_bench.py [--number 20] [--repeat 25] [--json OUT]

On a shared, noisy box a throughput run cannot tell a 0.3 ms change from noise; an isolated function
timed with `timeit` can, taking the minimum over repeats (the run least disturbed by other
processes; noise only ever adds time). Each phase runs on the serving bench's request bodies
(`serve_bench.make_bodies`: 100 candidates, Top-20 with the default image-search spec, JSON floats
and base64), and reports ms per call:

- `parse_reference` / `parse`: `RequestParser.parse_validated` (pydantic validation, then
  `features.to_candidate_list`: the parser before issue #17) against `RequestParser.parse` (orjson
  straight into the float32 arrays, the reference only for bodies it declines);
- `orjson_loads`: the JSON decode alone, the floor under any parser that builds Python objects;
- `respond`: `model_order` + `core.ranking.build_results` + `orjson.dumps` of the response payload;
- `hop_payload`: serialising what crosses the Router -> Scorer hop (the Top-M `CandidateList`:
  float32 arrays and the window's ids) with pickle protocol 5, what Ray's serializer does to a
  handle call's argument (measured here, not used by the project);
- `service`: `RerankService.rerank` end to end with in-process downstream calls (parse, arm, ordering,
  results, exposure record, stats); `service - parse` is the Router's per-request work besides parsing.

No Ray, no model: the numbers are the Router's user code only (Serve's HTTP ingress and handle calls
come on top; see serve_bench's CPU accounting per process). No timed assertions anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sys
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

import numpy as np  # noqa: E402
import orjson  # noqa: E402
from kit.machine import loadavg, run_header, say  # noqa: E402

TOP_M = 20


def best_ms(fn: Any, number: int, repeat: int) -> float:
    """Minimum over `repeat` runs of `number` calls, in ms per call."""
    return round(min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1000, 4)


def best_ms_interleaved(fns: dict[str, Any], number: int, repeat: int) -> dict[str, float]:
    """`best_ms` of several functions, their timed runs interleaved (a, b, c, a, b, c, ...), so a noisy
    stretch of the box hits all of them and the minima compare like with like."""
    timers = {k: timeit.Timer(fn) for k, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for k, t in timers.items():
            best[k] = min(best[k], t.timeit(number))
    return {k: round(v / number * 1000, 4) for k, v in best.items()}


def bodies_for(encoding: str, n_bodies: int, n_candidates: int, top_m: int) -> list[bytes]:
    import serve_bench

    return serve_bench.make_bodies(encoding, n_bodies=n_bodies, n_candidates=n_candidates, top_m=top_m)


def phase_parse(parser: Any, body: bytes, number: int, repeat: int) -> dict[str, float]:
    """The parser before (the reference path) and now, and the JSON decode alone."""
    reference = getattr(parser, "parse_validated", parser.parse)  # the code before #17 has only `parse`
    return best_ms_interleaved(
        {
            "parse_reference": lambda: reference(body, default_top_m=TOP_M),
            "parse": lambda: parser.parse(body, default_top_m=TOP_M),
            "orjson_loads": lambda: orjson.loads(body),
        },
        number,
        repeat,
    )


def phase_respond(parser: Any, body: bytes, number: int, repeat: int) -> dict[str, float]:
    """Ordering, the response items and their JSON, for a scored window."""
    from cotrr_ray.core.ranking import build_results, model_order

    req = parser.parse(body, default_top_m=TOP_M)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(req.window).astype(np.float32)
    probs = rng.random(req.window)

    def respond() -> bytes:
        order = model_order(logits, len(req.ids))
        items = build_results(req.ids, order, window=req.window, logits=logits, probabilities=probs, top_n=req.top_n)
        payload = {
            "request_id": "0" * 32,
            "model_version": "m",
            "arm": "treatment",
            "shadow": False,
            "fallback": None,
            "calibrated": True,
            "results": items,
        }
        return orjson.dumps(payload)

    return {"respond": best_ms(respond, number, repeat)}


def phase_hop_payload(parser: Any, body: bytes, number: int, repeat: int) -> dict[str, Any]:
    """What the Router sends the Scorer per request, serialised as Ray serialises a call argument."""
    req = parser.parse(body, default_top_m=TOP_M)
    data = pickle.dumps(req.inputs, protocol=5)
    return {
        "hop_payload": best_ms(lambda: pickle.dumps(req.inputs, protocol=5), number, repeat),
        "hop_payload_bytes": len(data),
        "hop_payload_dtypes": sorted({str(a.dtype) for a in [*req.inputs.features.values(), req.inputs.upstream]}),
    }


def phase_service(spec: Any, body: bytes, number: int, repeat: int) -> dict[str, float]:
    """`RerankService.rerank` with in-process downstream calls that answer at once."""
    from cotrr_ray.bundles.bundle import BundleMeta
    from cotrr_ray.config import AppArgs, RoutingConfig
    from cotrr_ray.serving.coalescer import Downstream
    from cotrr_ray.serving.scorer import ScoreResult
    from cotrr_ray.serving.service import RerankService

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(TOP_M).astype(np.float32)
    probs = np.sort(rng.random(TOP_M))

    async def score(cl: Any) -> ScoreResult:
        return ScoreResult(logits[: cl.window].copy(), "bench-model", "/bench", compute_ms=0.0)

    async def calibrate(item: Any) -> np.ndarray:
        return probs[: len(item.logits)]

    async def info(_: Any) -> dict[str, Any]:
        return {"bundle_id": "bench-model"}

    meta = BundleMeta(path="/bench", bundle_id="bench-model", spec=spec, top_m=TOP_M, relevance_threshold=2.0)
    args = AppArgs(bundle_uri="/bench", routing=RoutingConfig(rollout_percentage=100))
    service = RerankService(meta, args, Downstream(score, calibrate, info))
    loop = asyncio.new_event_loop()
    try:
        out = {"service": best_ms(lambda: loop.run_until_complete(service.rerank(body)), number, repeat)}
    finally:
        loop.close()
    return out


def run(number: int, repeat: int, encodings: list[str], n_bodies: int = 4) -> dict[str, Any]:
    from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
    from cotrr_ray.serving.api import RequestParser

    parser = RequestParser(IMAGE_SEARCH_SPEC, max_top_m=TOP_M, max_candidates=1000)
    result: dict[str, Any] = {
        **run_header(),
        "settings": {"number": number, "repeat": repeat, "candidates": 100, "top_m": TOP_M},
        "by_encoding": {},
    }
    for enc in encodings:
        body = bodies_for(enc, n_bodies, 100, TOP_M)[0]
        row: dict[str, Any] = {"body_bytes": len(body)}
        row.update(phase_parse(parser, body, number, repeat))
        row.update(phase_respond(parser, body, number, repeat))
        row.update(phase_hop_payload(parser, body, number, repeat))
        row.update(phase_service(IMAGE_SEARCH_SPEC, body, number, repeat))
        row["service_minus_parse"] = round(row["service"] - row["parse"], 4)
        row["parse_speedup"] = round(row["parse_reference"] / row["parse"], 3)
        result["by_encoding"][enc] = row
        say(f"{enc}: {row}")
    result["load"]["after"] = loadavg()
    return result


def print_table(result: dict[str, Any]) -> None:
    keys = ("parse_reference", "parse", "orjson_loads", "respond", "hop_payload", "service", "service_minus_parse")
    print(f"\nmin of {result['settings']['repeat']} repeats x {result['settings']['number']} calls, ms per call")
    print(f"{'':<22}" + "".join(f"{enc:>12}" for enc in result["by_encoding"]))
    for k in keys:
        print(f"{k:<22}" + "".join(f"{row[k]:>12.4f}" for row in result["by_encoding"].values()))
    print(f"load before {result['load']['before']} after {result['load']['after']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--number", type=int, default=2, help="calls per timed run (short runs find the quiet moments)")
    p.add_argument("--repeat", type=int, default=300, help="timed runs; the minimum is reported")
    p.add_argument("--encodings", default="json,base64")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    result = run(a.number, a.repeat, [e for e in a.encodings.split(",") if e])
    print_table(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
