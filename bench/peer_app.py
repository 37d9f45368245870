"""The peer: the simplest server a user would write instead of the Ray Serve graph.

One FastAPI + uvicorn process holding the same bundle, with no Ray anywhere. It reuses the project's
own code end to end, so the comparison measures the serving framework and nothing else:

- request parsing and validation: `cotrr_ray.serving.api.read_body` + `RequestParser` (inside `RerankService`);
- arm assignment, fallback, ordering, exposure record, stats: `cotrr_ray.serving.service.RerankService`;
- scoring: `cotrr_ray.serving.scorer.ScorerCore` (the same `Bundle.score`, one list per call, no batching);
- calibration: `cotrr_ray.serving.scorer.CalibratorCore` (the bundle's isotonic table);
- ordering and the response body: `cotrr_ray.core.ranking` via `RerankService`, serialised with orjson;
- the `Server-Timing` header (`cotrr_ray.serving.timing.StageTimings`), so the benchmark's per-stage profile
  compares like with like (here `score` is an in-process call: `score - model` is ~0).

The scorer and calibrator are plain in-process calls (blocking, on the event loop, one torch
thread), which is what a single-process service does.

    python bench/peer_app.py --bundle artifacts/registry/demo@production --port 8100 [--serve-config serve_config.yaml]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from cotrr_ray.bundles.bundle import read_meta  # noqa: E402
from cotrr_ray.bundles.registry import BundleSource, resolve_uri  # noqa: E402
from cotrr_ray.config import AppArgs, RoutingConfig  # noqa: E402
from cotrr_ray.serving.api import read_body  # noqa: E402
from cotrr_ray.serving.coalescer import Downstream  # noqa: E402
from cotrr_ray.serving.errors import RequestError  # noqa: E402
from cotrr_ray.serving.observability import ExposureLog  # noqa: E402
from cotrr_ray.serving.scorer import CalibratorCore, ScorerCore  # noqa: E402
from cotrr_ray.serving.service import RerankService  # noqa: E402
from cotrr_ray.serving.timing import SERVER_TIMING, StageTimings  # noqa: E402


def routing_from_serve_config(path: str | Path) -> RoutingConfig:
    """The Router's user_config in serve_config.yaml, so the peer applies the same routing."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    for app in cfg.get("applications", []):
        for dep in app.get("deployments", []):
            if dep.get("name") == "Router" and dep.get("user_config") is not None:
                return RoutingConfig.model_validate(dep["user_config"])
    return RoutingConfig(rollout_percentage=100)


def create_app(
    bundle_uri: str,
    *,
    routing: RoutingConfig | None = None,
    exposure_log_path: str | None = None,
    max_candidates: int = 1000,
    max_body_bytes: int = 8 * 1024 * 1024,
) -> FastAPI:
    """A FastAPI app serving `POST /v1/rerank` (same contract), `GET /healthz` and `GET /v1/stats`."""
    import torch

    torch.set_num_threads(1)
    bundle_uri = resolve_uri(bundle_uri, os.getcwd())
    meta = read_meta(BundleSource.parse(bundle_uri).resolve()[1])
    scorer = ScorerCore.load(bundle_uri)
    calibrator = CalibratorCore()
    calibrator.add(bundle_uri)

    async def score(cl: Any) -> Any:
        return scorer.score([cl])[0]

    async def calibrate(item: Any) -> Any:
        return calibrator.transform(item)

    async def info(_: Any) -> dict[str, Any]:
        return scorer.info()

    args = AppArgs(
        bundle_uri=bundle_uri,
        max_candidates=max_candidates,
        max_body_bytes=max_body_bytes,
        exposure_log_path=exposure_log_path,
        routing=routing or RoutingConfig(rollout_percentage=100),
    )
    log = logging.getLogger("cotrr_ray.peer.exposure")
    service = RerankService(
        meta, args, Downstream(score, calibrate, info), exposure=ExposureLog(exposure_log_path, log)
    )

    app = FastAPI(title="cotrr-ray peer (single process)")

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_body(request, args.max_body_bytes)
        except RequestError as e:
            service.note_rejected(e)
            return JSONResponse(e.body(), status_code=e.status)
        timings = StageTimings(read=(time.perf_counter() - t0) * 1000)
        try:
            payload = await service.rerank(body, request.headers.get("x-request-id"), timings)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return Response(orjson.dumps(payload), media_type="application/json", headers={SERVER_TIMING: timings.header()})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        healthy, detail = await service.health()
        return JSONResponse(detail, status_code=200 if healthy else 503)

    @app.get("/v1/stats")
    async def stats() -> Response:
        return Response(orjson.dumps(service.stats_snapshot()), media_type="application/json")

    app.state.service = service
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Single-process FastAPI + uvicorn peer of the cotrr-ray service.")
    p.add_argument("--bundle", default="artifacts/registry/demo@production")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--serve-config", default=str(REPO / "serve_config.yaml"), help="routing user_config source")
    p.add_argument("--exposure-log", default=None, help="exposure JSON lines file (default: a logger at WARNING)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn

    routing = (
        routing_from_serve_config(args.serve_config) if args.serve_config else RoutingConfig(rollout_percentage=100)
    )
    top_m = read_meta(BundleSource.parse(args.bundle, os.getcwd()).resolve()[1]).top_m
    if routing.top_m is not None and routing.top_m > top_m:  # a smaller bundle than the config's (tests)
        routing = routing.model_copy(update={"top_m": top_m})
    app = create_app(args.bundle, routing=routing, exposure_log_path=args.exposure_log)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
