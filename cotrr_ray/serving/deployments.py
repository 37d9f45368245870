"""Ray Serve deployments: thin shells around the plain `service.RerankService` and `scorer` cores.

    Router (FastAPI ingress) --score_many--> Scorer [, ScorerControl]   (@serve.batch, torch)
                             --transform_many--> Calibrator              (isotonic)

Each hop carries the Top-M windows of all concurrent requests of a router replica (`Coalescer`):
one hop's fixed cost per batch, not per request. Fused mode (`AppArgs.fused_calibration`): the
Scorer calibrates and there is no Calibrator.

Nothing is bound here; `cotrr_ray.serving.app.build_app` wires the graph. Decorator options are the
defaults for apps built from Python; serve_config.yaml overrides them per deployment.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of
# the ingress methods (Serve rebinds them, and string annotations then fail to resolve).
import asyncio
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

import cotrr_ray
from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.bundles.registry import BundleSource, resolve_uri
from cotrr_ray.config import AppArgs, RoutingConfig, ScorerConfig
from cotrr_ray.core.features import CandidateList
from cotrr_ray.experiments.eventlog import EventLog
from cotrr_ray.serving.api import ErrorResponse, RerankResponse, install_openapi, read_body
from cotrr_ray.serving.coalescer import Coalescer, Downstream, answer_each
from cotrr_ray.serving.errors import HTTP_CODES, RequestError, error_body, exception_name
from cotrr_ray.serving.observability import ExposureLog, RateLimitedLog
from cotrr_ray.serving.rollout import ADMIN_BODY_LIMIT, AdminAPI
from cotrr_ray.serving.scorer import CalibrationInput, CalibratorCore, ScorerCore, ScoreResult
from cotrr_ray.serving.service import WARNING_INTERVAL_S, RerankService
from cotrr_ray.serving.timing import SERVER_TIMING

logger = logging.getLogger("ray.serve")

# A Scorer's failures travel back as values (`answer_each`), without their traceback: logged here,
# with it, at most once a minute per exception type (one replica per process).
_SCORING_FAILURES = RateLimitedLog(logger, WARNING_INTERVAL_S, level=logging.ERROR)

api = FastAPI(
    title="cotrr-ray rerank",
    version=cotrr_ray.__version__,
    description="Listwise reranking of image-search candidates (Top-M reranked, tail in upstream order).",
)
install_openapi(api)


def _route_package_logs_to_serve() -> None:
    """Send `cotrr_ray.*` loggers (bundle loaded, hot swaps, calibration warnings) to this
    replica's Serve log handlers, at the level of serve_config.yaml's logging_config."""
    serve_logger = logging.getLogger("ray.serve")
    package = logging.getLogger("cotrr_ray")
    for handler in serve_logger.handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.setLevel(serve_logger.level)
    package.propagate = False


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    body = error_body(HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s (request %s)", request.url.path, request.headers.get("x-request-id"))
    return JSONResponse(error_body("internal", type(exc).__name__), status_code=500)


class ServeMetrics:
    """`serving.Metrics` on `ray.serve.metrics` (exported as ray_cotrr_* on the Prometheus port)."""

    _LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]

    def __init__(self) -> None:
        self._requests = Counter(
            "cotrr_rerank_requests", description="Rerank responses by arm and outcome.", tag_keys=("arm", "outcome")
        )
        self._latency = Histogram(
            "cotrr_rerank_latency_ms",
            description="Router handling time of a rerank request.",
            boundaries=self._LATENCY_MS,
            tag_keys=("arm",),
        )
        self._rejected = Counter("cotrr_rerank_rejected", description="4xx by error code.", tag_keys=("code",))
        self._fallbacks = Counter(
            "cotrr_rerank_fallbacks", description="Upstream-order fallbacks by reason.", tag_keys=("reason",)
        )
        self._calibration = Counter(
            "cotrr_calibration_failures", description="Answers without probabilities.", tag_keys=("reason",)
        )
        self._shadow = Counter(
            "cotrr_shadow_comparisons", description="Shadow scorings by outcome.", tag_keys=("outcome",)
        )
        # Ray histograms take positive boundaries only, so Kendall tau (-1..1) is exported as the
        # share of discordant window pairs, (1 - tau) / 2 in 0..1 (0 = same order, 1 = reversed).
        self._discordance = Histogram(
            "cotrr_shadow_discordant_pairs_ratio",
            description="(1 - Kendall tau) / 2 between the control and treatment windows.",
            boundaries=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],
        )
        self._overlap = Histogram(
            "cotrr_shadow_overlap_at_10",
            description="Overlap@10 between control and treatment orders.",
            boundaries=[0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        )
        self._shadow_latency = Histogram(
            "cotrr_shadow_latency_ms", description="Shadow scoring latency.", boundaries=self._LATENCY_MS
        )
        self._rollout = Gauge("cotrr_rollout_percentage", description="Current rollout percentage.")
        self._shadow_mode = Gauge("cotrr_shadow_mode", description="1 when shadow mode is on.")
        self._by_model = Counter(
            "cotrr_responses_by_model",
            description="Served responses by the bundle id that ordered them.",
            tag_keys=("model_version",),
        )
        self._fallback_ratio = Gauge(
            "cotrr_fallback_ratio",
            description="Fallbacks / served responses of this router replica over the last 60 s, by arm.",
            tag_keys=("arm",),
        )
        self._versions = Gauge(
            "cotrr_model_versions_served",
            description="Distinct treatment bundle ids that answered this replica in the last 60 s (>1: skew).",
        )
        self._ratio_arms: set[str] = set()
        self._feedback = Counter(
            "cotrr_feedback_events",
            description="Feedback events by outcome (accepted, duplicate, rejected) and type.",
            tag_keys=("outcome", "type"),
        )
        self._commit_ms = Histogram(
            "cotrr_event_log_commit_ms",
            description="Event log group commit: enqueue to fsync, by record kind (decisions: the loss window).",
            boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=("kind",),
        )
        self._log_records = Counter(
            "cotrr_event_log_records", description="Records fsync'ed to the event log.", tag_keys=("kind",)
        )
        self._rotated = Counter(
            "cotrr_event_log_segments_closed",
            description="Event log segments closed (uploaded for s3://), by kind and reason.",
            tag_keys=("kind", "reason"),
        )

    def request(self, arm: str, outcome: str, latency_ms: float) -> None:
        self._requests.inc(1, tags={"arm": arm, "outcome": outcome})
        self._latency.observe(latency_ms, tags={"arm": arm})

    def rejected(self, code: str) -> None:
        self._rejected.inc(1, tags={"code": code})

    def fallback(self, reason: str) -> None:
        self._fallbacks.inc(1, tags={"reason": reason})

    def calibration_failure(self, reason: str) -> None:
        self._calibration.inc(1, tags={"reason": reason})

    def shadow(self, outcome: str, comparison: dict[str, float] | None, latency_ms: float | None) -> None:
        self._shadow.inc(1, tags={"outcome": outcome})
        if comparison is not None:
            self._discordance.observe((1.0 - comparison["kendall_tau"]) / 2.0)
            self._overlap.observe(comparison["overlap_at_10"])
        if latency_ms is not None:
            self._shadow_latency.observe(latency_ms)

    def routing(self, config: RoutingConfig) -> None:
        self._rollout.set(config.rollout_percentage)
        self._shadow_mode.set(1.0 if config.shadow_mode else 0.0)

    def response_model(self, model_version: str) -> None:
        self._by_model.inc(1, tags={"model_version": model_version})

    def feedback(self, outcome: str, event_type: str, n: int) -> None:
        self._feedback.inc(n, tags={"outcome": outcome, "type": event_type})

    def event_log_commit(self, kind: str, records: int, latency_ms: float) -> None:
        self._log_records.inc(records, tags={"kind": kind})
        self._commit_ms.observe(latency_ms, tags={"kind": kind})

    def segment_rotated(self, kind: str, reason: str) -> None:
        self._rotated.inc(1, tags={"kind": kind, "reason": reason})

    def window(self, fallback_ratio: dict[str, float], model_versions: int) -> None:
        # An arm without traffic in the window had no fallbacks there: 0, not its last ratio forever.
        self._ratio_arms.update(fallback_ratio)
        for arm in self._ratio_arms:
            self._fallback_ratio.set(fallback_ratio.get(arm, 0.0), tags={"arm": arm})
        self._versions.set(model_versions)


@serve.deployment(name="Router", max_ongoing_requests=64, max_queued_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Router:
    """HTTP ingress: validation, arm assignment, fallback, shadow, stats (see RerankService)."""

    def __init__(
        self,
        scorer: DeploymentHandle,
        calibrator: DeploymentHandle | None,
        control: DeploymentHandle | None,
        args: AppArgs,
    ) -> None:
        _route_package_logs_to_serve()
        meta = read_meta(BundleSource.parse(args.bundle_uri).resolve()[1])  # spec and limits; weights stay unread
        max_top_m = meta.top_m
        if control is not None and args.control_bundle_uri is not None:
            max_top_m = min(max_top_m, read_meta(BundleSource.parse(args.control_bundle_uri).resolve()[1]).top_m)
        # The request payload (numpy windows) goes with the C pickler: no cloudpickle Python pass
        # over every array (only used by the gRPC transport of RAY_SERVE_THROUGHPUT_OPTIMIZED).
        fast = {"request_serialization": "pickle"}
        self.coalescers = {"scorer": Coalescer(scorer.options(method_name="score_many", **fast).remote)}
        if calibrator is not None:
            self.coalescers["calibrator"] = Coalescer(calibrator.options(method_name="transform_many", **fast).remote)
        if control is not None:
            self.coalescers["control_scorer"] = Coalescer(control.options(method_name="score_many", **fast).remote)
        downstream = Downstream(
            score=self.coalescers["scorer"],
            calibrate=self.coalescers.get("calibrator"),
            info=lambda _: scorer.info.remote(),
            score_control=self.coalescers.get("control_scorer"),
            info_control=(lambda _: control.info.remote()) if control is not None else None,
        )
        metrics = ServeMetrics()
        self.events = None
        ev = args.event_log
        if ev.uri is not None:  # uploads a killed replica's staged segments before taking traffic
            self.events = EventLog(
                ev.uri,
                staging_dir=ev.staging_dir,
                max_segment_bytes=ev.max_segment_bytes,
                max_segment_age_s=ev.max_segment_age_s,
                commit_interval_s=ev.commit_interval_s,
                on_commit=metrics.event_log_commit,
                on_rotate=metrics.segment_rotated,
            )
        self.service = RerankService(
            meta,
            args,
            downstream,
            max_top_m=max_top_m,
            metrics=metrics,
            exposure=ExposureLog(args.exposure_log_path),
            events=self.events,
        )
        self._configure_coalescers(args.routing)
        self.admin = AdminAPI(args.event_log.uri)  # rollout operator commands; COTRR_ADMIN_TOKEN or off

    async def reconfigure(self, user_config: dict[str, Any]) -> None:  # on the event loop: no races
        config = RoutingConfig.model_validate(user_config)
        self.service.configure(config)
        self._configure_coalescers(config)

    def _configure_coalescers(self, config: RoutingConfig) -> None:
        for c in self.coalescers.values():
            c.configure(max_items=config.coalesce_max_lists, max_in_flight=config.coalesce_max_in_flight)

    @api.post(
        "/v1/rerank",
        response_model=None,
        responses={200: {"model": RerankResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="Rerank the Top-M of an upstream candidate list",
    )
    async def rerank(self, request: Request) -> Response:
        status, payload, timings = await self.service.handle_http(request)
        headers = None
        if timings is not None and self.service.config.server_timing:
            headers = {SERVER_TIMING: timings.header()}
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)

    @api.post(
        "/v1/feedback",
        response_model=None,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
        summary="Record impressions, clicks and conversions of reranked items (durable once answered 200)",
    )
    async def feedback(self, request: Request) -> Response:
        status, payload = await self.service.handle_feedback(request)
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

    @api.get(
        "/v1/experiments/{experiment_id}",
        response_model=None,
        responses={404: {"model": ErrorResponse}},
        summary="An experiment's report from the event log: per-arm metrics, SRM, sequential tests, interleaving",
    )
    async def experiment(self, experiment_id: str) -> Response:
        status, payload = await self.service.experiment(experiment_id)
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

    @api.get(
        "/experiments/{experiment_id}",
        response_class=HTMLResponse,
        responses={404: {"description": "no event log, or no decision of the experiment (HTML)"}},
        summary="An experiment's page: stage timeline, per-arm metrics, confidence sequences, SRM, guardrails",
    )
    async def experiment_page(self, experiment_id: str) -> Response:
        status, page = await self.service.experiment_page(experiment_id)
        return HTMLResponse(page, status_code=status)

    # ---------------------------------------------------------------- rollouts (serving.rollout.AdminAPI)

    @api.get("/v1/experiments", response_model=None, summary="Experiments with a rollout controller, and their stage")
    async def experiments(self) -> Response:
        status, payload = await asyncio.to_thread(self.admin.experiments, self.service.config.model_dump())
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

    @api.post(
        "/admin/experiments/{experiment_id}/{action}",
        response_model=None,
        responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
        summary="Operator: pause, resume, abort or force a rollout stage (Authorization: Bearer <admin token>)",
    )
    async def admin_command(self, experiment_id: str, action: str, request: Request) -> Response:
        try:
            body = await read_body(request, ADMIN_BODY_LIMIT)
        except RequestError as e:
            return Response(orjson.dumps(e.body()), status_code=e.status, media_type="application/json")
        auth = request.headers.get("authorization")
        status, payload = await asyncio.to_thread(self.admin.command, experiment_id, action, auth, body)
        return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

    def __del__(self) -> None:
        # Graceful replica shutdown: commit what is queued and close (upload) the open segments.
        events = getattr(self, "events", None)
        if events is not None:
            events.close()

    @api.get("/v1/model", summary="Served model, feature spec, Top-M limits and routing config")
    async def model(self) -> Response:
        return Response(orjson.dumps(await self.service.model_info()), media_type="application/json")

    @api.get("/v1/stats", summary="Counters of this router replica")
    async def stats(self) -> Response:
        snapshot = self.service.stats_snapshot()
        snapshot["coalescing"] = {name: c.stats() for name, c in self.coalescers.items()}
        return Response(orjson.dumps(snapshot), media_type="application/json")

    @api.get("/healthz", summary="200 when scorer(s) and calibrator answer a real inference")
    async def healthz(self) -> JSONResponse:
        healthy, detail = await self.service.health()
        return JSONResponse(detail, status_code=200 if healthy else 503)


@serve.deployment(name="Scorer", max_ongoing_requests=32, max_queued_requests=64, ray_actor_options={"num_cpus": 1})
class Scorer:
    """Loads a bundle (fails closed), scores batches of windows, hot-swaps; calibrates in fused mode.

    Given an alias (`<registry>/<name>@production`), every replica resolves it when it loads and then
    polls it every `ScorerConfig.alias_poll_s`: a moved alias is downloaded, checked, warmed up and
    swapped in, so all replicas converge on the new id within one interval (plus the load).

    The model runs on the replica's event loop, not in a thread pool: no hand-off per batch, and
    calls that arrive while a batch runs queue up and form the next batch (with
    max_concurrent_batches=1, a thread pool would let @serve.batch close tiny batches meanwhile).
    """

    def __init__(self, bundle_uri: str, base_dir: str, calibrate: bool = False) -> None:
        import torch

        _route_package_logs_to_serve()
        torch.set_num_threads(1)  # one intra-op thread per replica; scale with replicas
        self.base_dir = base_dir
        self.calibrate = calibrate
        self.args_uri = resolve_uri(bundle_uri, base_dir)
        self.source = BundleSource.parse(self.args_uri)
        self.core = ScorerCore.load(self.args_uri)  # BundleError -> the replica does not start
        self.config = ScorerConfig()
        self._configured = False
        self._poller: asyncio.Task | None = None
        # lists / batches = the mean model batch. Both are ours, bumped together in one process, so one
        # scrape sees them consistent (Serve's batches_processed is exported on its own schedule, and
        # its actual_batch_size histogram sum is approximated from bucket midpoints).
        self._lists_metric = Counter("cotrr_scorer_lists", description="Top-M windows scored by the model.")
        self._batches_metric = Counter("cotrr_scorer_batches", description="Model forward passes (batches).")

    async def check_health(self) -> None:
        """Serve's periodic replica check (`health_check_period_s`): a real forward pass on a synthetic
        list, ~1 ms on the event loop; an exception makes Serve replace the replica. Injected faults
        (ScorerConfig.fault) act on scoring calls only, so they never fail this check."""
        self.core.health_check()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = ScorerConfig.model_validate(user_config)
        self._score_batch.set_max_batch_size(config.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        target = resolve_uri(config.bundle_uri, self.base_dir) if config.bundle_uri else self.args_uri
        if target != self.source.uri:
            try:
                bundle = await asyncio.to_thread(self.core.load_replacement, target)
            except Exception as e:
                if not self._configured:
                    raise  # a fresh replica never serves a bundle other than the configured one
                self.core.swap_failed(target, e)
            else:
                self.core.swap(bundle)
                self.source = BundleSource.parse(target)
        self.config = config
        self._configured = True
        if self._poller is None:  # reconfigure runs on the replica's loop; __init__ may not
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())

    async def _follow_alias(self) -> None:
        """Poll the served alias (if it is one) and swap when it moves; errors are logged, never fatal."""
        while True:
            await asyncio.sleep(self.config.alias_poll_s or 1.0)
            if not (self.source.moving and self.config.alias_poll_s):
                continue
            try:
                await asyncio.to_thread(self.core.follow, self.source)
            except Exception as e:  # registry unreachable: keep serving what is loaded
                logger.warning(
                    "alias poll of %s failed; still serving %s: %r", self.source.uri, self.core.bundle.bundle_id, e
                )

    async def score_many(self, lists: list[CandidateList]) -> list[ScoreResult | Exception]:
        """Windows of several requests (one coalesced router call) -> one result per window; if
        scoring fails, its exception per window, returned (cheap), logged here (`answer_each`)."""
        return await answer_each(self._score_lists(lists), len(lists), self._scoring_failed)

    def _scoring_failed(self, e: Exception) -> None:
        reason = f"score_error:{exception_name(e)}"
        _SCORING_FAILURES.log(reason, "scoring failed; each list of the call answers with the error", e)

    async def _score_lists(self, lists: list[CandidateList]) -> list[ScoreResult]:
        step = self.config.max_batch_size
        if len(lists) <= step:
            return await self._score_batch(lists)
        parts = await asyncio.gather(*(self._score_batch(lists[i : i + step]) for i in range(0, len(lists), step)))
        return [r for part in parts for r in part]

    async def score(self, cl: CandidateList) -> ScoreResult:
        """One window (the pre-coalescing API, kept for other callers)."""
        return (await self._score_batch([cl]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=lambda calls: sum(len(c) for c in calls))
    async def _score_batch(self, calls: list[list[CandidateList]]) -> list[list[ScoreResult]]:
        if self.config.fault == "raise":
            raise RuntimeError("injected scorer fault (ScorerConfig.fault='raise', testing only)")
        if self.config.fault == "slow":
            await asyncio.sleep(self.config.fault_delay_s)
        out = self.core.score_calls(calls, calibrate=self.calibrate)  # blocking on purpose (see class doc)
        self._lists_metric.inc(sum(map(len, calls)))  # lists before batches: a scrape in between never shows a mean < 1
        self._batches_metric.inc()
        return out

    async def info(self) -> dict[str, Any]:
        return {
            **self.core.info(),
            "source": self.source.uri,
            "fused_calibration": self.calibrate,
            "config": self.config.model_dump(),
        }


@serve.deployment(
    name="Calibrator", max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0.25}
)
class Calibrator:
    """Isotonic transform raw logit -> probability, by the bundle that made the logit.

    No @serve.batch: np.interp on a window costs microseconds, less than the batching queue's own
    bookkeeping; the router already sends the windows of concurrent requests in one call.
    """

    def __init__(self, bundle_uris: list[str]) -> None:
        _route_package_logs_to_serve()
        self.core = CalibratorCore()
        for uri in bundle_uris:
            self.core.add(uri)  # fails closed like the scorer

    async def check_health(self) -> None:
        """Serve's periodic replica check: every loaded calibrator maps logits into [0, 1]."""
        self.core.health_check()

    async def transform(self, item: CalibrationInput) -> Any:
        value = (await self.transform_many([item]))[0]
        if isinstance(value, Exception):
            raise value
        return value

    async def transform_many(self, items: list[CalibrationInput]) -> list[Any]:
        """One entry per item: its probabilities, or the exception that failed only that item."""
        missing = self.core.missing(items)
        errors = await asyncio.to_thread(self.core.load_missing, missing) if missing else {}
        return self.core.transform_each(items, errors)
