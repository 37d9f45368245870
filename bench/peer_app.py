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
thread), which is what a single-process service does. `--workers N` runs N such processes behind
one port (uvicorn's multiprocess supervisor; the kernel spreads connections over them): one per core
is what a user benchmarking this box would run, so it is the bench's fair peer.

    python bench/peer_app.py --bundle artifacts/registry/demo@production --port 8100 [--workers 2] [--serve-config serve_config.yaml]

uvicorn needs an import string to start several workers, so the workers build their app with the
factory `peer_app:app_from_env`, configured by the `COTRR_PEER_*` environment variables that `main`
sets (equivalently: `COTRR_PEER_BUNDLE=... uvicorn --app-dir bench --factory peer_app:app_from_env --workers 2`).
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


ENV_BUNDLE = "COTRR_PEER_BUNDLE"
ENV_SERVE_CONFIG = "COTRR_PEER_SERVE_CONFIG"
ENV_EXPOSURE_LOG = "COTRR_PEER_EXPOSURE_LOG"


def peer_routing(bundle: str, serve_config: str | None) -> RoutingConfig:
    """The Router's routing of `serve_config` (default: all treatment), top_m capped at the bundle's."""
    routing = routing_from_serve_config(serve_config) if serve_config else RoutingConfig(rollout_percentage=100)
    top_m = read_meta(BundleSource.parse(bundle, os.getcwd()).resolve()[1]).top_m
    if routing.top_m is not None and routing.top_m > top_m:  # a smaller bundle than the config's (tests)
        routing = routing.model_copy(update={"top_m": top_m})
    return routing


def app_from_env() -> FastAPI:
    """The app factory each uvicorn worker calls (`--factory peer_app:app_from_env`): bundle, routing
    source and exposure log from COTRR_PEER_BUNDLE / COTRR_PEER_SERVE_CONFIG / COTRR_PEER_EXPOSURE_LOG.
    Workers share the exposure file: its lines are O_APPEND writes, which do not interleave."""
    bundle = os.environ.get(ENV_BUNDLE)
    if not bundle:
        raise RuntimeError(f"{ENV_BUNDLE} is not set: the bundle URI the peer serves")
    serve_config = os.environ.get(ENV_SERVE_CONFIG) or None
    return create_app(
        bundle,
        routing=peer_routing(bundle, serve_config),
        exposure_log_path=os.environ.get(ENV_EXPOSURE_LOG) or None,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Single-process FastAPI + uvicorn peer of the cotrr-ray service.")
    p.add_argument("--bundle", default="artifacts/registry/demo@production")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--serve-config", default=str(REPO / "serve_config.yaml"), help="routing user_config source")
    p.add_argument("--exposure-log", default=None, help="exposure JSON lines file (default: a logger at WARNING)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one per core: the fair peer)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn

    # The workers (spawned processes) read their settings from the environment they inherit.
    os.environ[ENV_BUNDLE] = args.bundle
    os.environ[ENV_SERVE_CONFIG] = args.serve_config or ""
    os.environ[ENV_EXPOSURE_LOG] = args.exposure_log or ""
    uvicorn.run(
        "peer_app:app_from_env",
        factory=True,
        app_dir=str(Path(__file__).resolve().parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
