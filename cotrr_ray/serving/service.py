"""`RerankService`: one rerank request from body to response payload, as a plain object (no Ray, no torch).

Per request it parses and validates the body (`api.RequestParser`), assigns the arm
(`experiments.assignment.decide`), scores the window and calibrates it within one time budget
through the injected `coalescer.Downstream` calls, orders the list, and falls back to the upstream
order (flagged, still a 200) when the scorer fails; in shadow mode it scores the treatment in the
background, pausing it while it keeps failing. What happened goes to `observability` (stats with
their sliding windows, metrics, exposure log, rate-limited warnings with the exception) and `timing`.
It also answers the GET endpoints' questions (health, model info, stats) and `POST /v1/feedback`
(`handle_feedback`: validated events, deduplicated by event_id, acknowledged once fsync'ed in the
`experiments.eventlog.EventLog`, which also receives one decision record per answered request).

`deployments.Router` (Serve) and `bench/peer_app.py` (one process) are HTTP shells around it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from cotrr_ray.bundles.bundle import BundleMeta
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.core.ranking import agreement, build_results, model_order, upstream_order
from cotrr_ray.experiments.assignment import decide
from cotrr_ray.experiments.eventlog import EventLog
from cotrr_ray.experiments.events import (
    Decision,
    FeedbackError,
    FeedbackLimits,
    FeedbackParser,
    RecentIds,
    displayed_items,
    feedback_record,
    split_new,
)
from cotrr_ray.experiments.interleaving import Interleaved, team_draft
from cotrr_ray.experiments.page import load_status, render_error, render_page
from cotrr_ray.experiments.report import experiment_report
from cotrr_ray.serving.api import ParsedRequest, RequestParser, read_body
from cotrr_ray.serving.coalescer import Breaker, Downstream, DownstreamCall, call_with_timeout
from cotrr_ray.serving.errors import InvalidOutput, RequestError, error_body, exception_name, from_validation_error
from cotrr_ray.serving.observability import ExposureLog, Metrics, NullMetrics, RateLimitedLog, ServingStats
from cotrr_ray.serving.scorer import CalibrationInput, ScoreResult, synthetic_list
from cotrr_ray.serving.timing import StageTimings

logger = logging.getLogger(__name__)

WARNING_INTERVAL_S = 60.0
"""At most one warning per failure reason per this many seconds (`RateLimitedLog`)."""

SHADOW_MAX_FAILURES, SHADOW_PAUSE_S = 5, 5.0
"""The shadow pauses after this many consecutive errors, for this long (`Breaker`)."""


@dataclass
class _Outcome:
    order: np.ndarray
    logits: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    model_version: str | None = None
    fallback: str | None = None


def _check_probabilities(probs: np.ndarray, window: int) -> np.ndarray:
    if probs.shape != (window,) or not (np.isfinite(probs).all() and (0 <= probs).all() and (probs <= 1).all()):
        raise InvalidOutput(f"calibrator returned probabilities of shape {probs.shape} outside [0, 1]")
    return probs


def _check_logits(result: Any, window: int) -> ScoreResult:
    if not isinstance(result, ScoreResult):
        raise InvalidOutput(f"scorer returned {type(result).__name__}, expected ScoreResult")
    logits = np.asarray(result.logits)
    if logits.shape != (window,) or not np.isfinite(logits).all():
        raise InvalidOutput(f"scorer returned logits of shape {logits.shape} (non-finite or not ({window},))")
    return result


class RerankService:
    """The router's logic. One instance per router replica; all methods run on its event loop."""

    def __init__(
        self,
        meta: BundleMeta,
        args: AppArgs,
        downstream: Downstream,
        *,
        max_top_m: int | None = None,
        metrics: Metrics | None = None,
        exposure: ExposureLog | None = None,
        events: EventLog | None = None,
    ):
        self.meta = meta
        self.args = args
        self.down = downstream
        self.max_top_m = max_top_m or meta.top_m
        self.parser = RequestParser(meta.spec, max_top_m=self.max_top_m, max_candidates=args.max_candidates)
        self.metrics: Metrics = metrics or NullMetrics()
        self.exposure = exposure or ExposureLog(None)
        self.events = events  # the durable event log (decisions + feedback); None = feedback is off
        ev = args.event_log
        self.feedback_parser = FeedbackParser(
            FeedbackLimits(
                max_events=ev.max_events_per_batch,
                max_string_length=ev.max_string_length,
                event_types=tuple(ev.event_types),
                max_event_age_s=ev.max_event_age_s,
                max_clock_skew_s=ev.max_clock_skew_s,
            ),
            clock=lambda: self.clock(),
        )
        self.recent_ids = RecentIds(ev.recent_ids)
        self.stats = ServingStats()
        self.warnings = RateLimitedLog(logger, WARNING_INTERVAL_S)
        self.clock = time.time  # wall clock of the stats windows and exposure records (replaceable in tests)
        self.replica = {"id": uuid.uuid4().hex, "pid": os.getpid(), "started_at": time.time()}
        self._model_version = meta.bundle_id  # last treatment version seen (changes on hot swap)
        self._background: set[asyncio.Task] = set()
        self._shadow_in_flight = 0
        self.shadow_breaker = Breaker(SHADOW_MAX_FAILURES, SHADOW_PAUSE_S)
        self._health_list = synthetic_list(meta.spec, n=4, window=min(4, self.max_top_m))
        self.configure(args.routing)

    # -------------------------------------------------------------- configuration

    def configure(self, config: RoutingConfig) -> None:
        """Apply a RoutingConfig (the router's user_config); invalid values raise, nothing changes."""
        if config.top_m is not None and config.top_m > self.max_top_m:
            raise ValueError(f"routing top_m {config.top_m} exceeds the bundle's top_m {self.max_top_m}")
        self.config = config
        self.default_top_m = config.top_m or self.max_top_m
        self.metrics.routing(config)
        logger.info("routing config: %s", config.model_dump())

    # -------------------------------------------------------------- POST /v1/rerank

    async def handle_http(self, request: Any) -> tuple[int, dict[str, Any], StageTimings | None]:
        """`POST /v1/rerank` from a Starlette request: (status, JSON body, stage timings of a 200).

        A refused request (body too large, invalid) is counted and answered with its error body; any
        other exception propagates (the HTTP layer answers 500) after being counted.
        """
        t0 = time.perf_counter()
        try:
            body = await read_body(request, self.args.max_body_bytes)
        except RequestError as e:
            self.note_rejected(e)
            return e.status, e.body(), None
        timings = StageTimings(read=(time.perf_counter() - t0) * 1000)
        try:
            payload = await self.rerank(body, request.headers.get("x-request-id"), timings)
        except RequestError as e:  # already counted
            return e.status, e.body(), None
        return 200, payload, timings

    async def rerank(
        self, body: bytes, request_id: str | None = None, timings: StageTimings | None = None
    ) -> dict[str, Any]:
        """The response payload; `timings`, when given, receives the stage times (Server-Timing).

        Raises `RequestError` for bad input (counted in `rejected`); an unexpected exception is
        counted in `internal_errors` and re-raised.
        """
        t0 = time.perf_counter()
        self.stats.requests += 1
        try:
            return await self._rerank(body, request_id or uuid.uuid4().hex, timings or StageTimings(), t0)
        except RequestError as e:
            self._count_rejected(e)
            raise
        except Exception:
            self.stats.internal_errors += 1
            raise

    async def _rerank(self, body: bytes, request_id: str, tm: StageTimings, t0: float) -> dict[str, Any]:
        cfg = self.config
        req = self.parser.parse(body, default_top_m=self.default_top_m)
        tm.parse = (time.perf_counter() - t0) * 1000
        decision = decide(
            req.unit_id, req.query_id, salt=cfg.experiment_salt, rollout_percentage=cfg.rollout_percentage
        )
        arm = "control" if cfg.shadow_mode else decision.arm
        n = len(req.ids)
        merged: Interleaved | None = None
        if arm == "treatment" and cfg.mode == "interleave":
            arm = "interleave"
            out, merged = await self._interleave(request_id, req, cfg, tm)
        elif arm == "treatment":
            out = await self._score(self.down.score, req, cfg.timeout_ms / 1000, "scorer", tm)
        elif self.down.score_control is not None:
            out = await self._score(self.down.score_control, req, cfg.timeout_ms / 1000, "control_scorer", tm)
        else:
            out = _Outcome(upstream_order(n))
        results = build_results(
            req.ids, out.order, window=req.window, logits=out.logits, probabilities=out.probabilities, top_n=req.top_n
        )
        latency_ms = (time.perf_counter() - t0) * 1000
        self._record(request_id, req, decision, arm, cfg, out, latency_ms)
        if self.events is not None:
            self._log_decision(request_id, req, decision, arm, cfg, out, latency_ms, results, merged)
        if cfg.shadow_mode:
            self._spawn_shadow(request_id, req, out.order, cfg)
        payload = {
            "request_id": request_id,
            "model_version": out.model_version,
            "arm": arm,
            "shadow": cfg.shadow_mode,
            "fallback": out.fallback,
            "calibrated": out.probabilities is not None,
            "results": results,
        }
        tm.total = (time.perf_counter() - t0) * 1000
        return payload

    async def _interleave(
        self, request_id: str, req: ParsedRequest, cfg: RoutingConfig, tm: StageTimings
    ) -> tuple[_Outcome, Interleaved | None]:
        """Both arms rank the window (concurrently, one budget); the unit sees their team-draft merge.

        The treatment's scores and probabilities are the ones answered for every item: it scored the
        whole window, and the control may be upstream order with no scores at all. A failing
        treatment answers upstream order (flagged, not interleaved), as in A/B; a failing control
        ranks by upstream order, which is what its own arm would have shown.
        """
        timeout_s = cfg.timeout_ms / 1000
        treated = self._score(self.down.score, req, timeout_s, "scorer", tm)
        if self.down.score_control is not None:
            control_tm = StageTimings()  # the response's Server-Timing reports the treatment's stages
            treat, control = await asyncio.gather(
                treated, self._score(self.down.score_control, req, timeout_s, "control_scorer", control_tm)
            )
        else:
            treat, control = await treated, _Outcome(upstream_order(len(req.ids)))
        if treat.fallback is not None:
            return treat, None
        w = req.window
        merged = team_draft(
            treat.order[:w].tolist(), control.order[:w].tolist(), key=request_id, salt=cfg.experiment_salt, k=w
        )
        order = np.concatenate([np.asarray(merged.order, dtype=treat.order.dtype), treat.order[w:]])
        out = _Outcome(order, logits=treat.logits, probabilities=treat.probabilities, model_version=treat.model_version)
        return out, merged

    def note_rejected(self, e: RequestError) -> None:
        """Count a request refused before `rerank` saw it (e.g. an oversized body)."""
        self.stats.requests += 1
        self._count_rejected(e)

    def _count_rejected(self, e: RequestError) -> None:
        self.stats.rejected[e.code] += 1
        self.metrics.rejected(e.code)

    async def _score(
        self, score: DownstreamCall, req: ParsedRequest, timeout_s: float, who: str, timings: StageTimings
    ) -> _Outcome:
        """Scorer then calibrator within one budget; upstream order on any scorer failure."""
        start = time.perf_counter()
        n = len(req.ids)
        try:
            result = _check_logits(await call_with_timeout(score, req.inputs, timeout_s), req.window)
        except TimeoutError as e:
            return self._fallback(n, f"{who}_timeout", e)
        except Exception as e:  # any downstream failure: serve the upstream order, flagged and logged
            return self._fallback(n, f"{who}_error:{exception_name(e)}", e)
        scored = time.perf_counter()
        timings.score = (scored - start) * 1000
        timings.model = result.compute_ms
        if who == "scorer":
            self._model_version = result.model_version
        out = _Outcome(model_order(result.logits, n), logits=result.logits, model_version=result.model_version)
        remaining = timeout_s - (scored - start)
        try:
            out.probabilities, timings.calibrate = await self._calibrate(result, req.window, remaining)
        except TimeoutError as e:
            self._calibration_failed("calibrator_timeout", e)
        except Exception as e:  # ordered by the scorer anyway; probabilities are null
            self._calibration_failed(f"calibrator_error:{exception_name(e)}", e)
        return out

    def _calibration_failed(self, reason: str, error: BaseException) -> None:
        self.stats.calibration_failures[reason] += 1
        self.metrics.calibration_failure(reason)
        self.warnings.log(reason, "calibration failed; answered in the scorer's order without probabilities", error)

    async def _calibrate(self, result: ScoreResult, window: int, timeout_s: float) -> tuple[np.ndarray, float | None]:
        """Checked probabilities of a scored window and the calibrator's round trip (None when fused)."""
        if result.probabilities is not None or self.down.calibrate is None:  # fused: calibrated by the scorer
            if result.probabilities is None:
                raise InvalidOutput("the scorer returned no probabilities and there is no calibrator")
            return _check_probabilities(np.asarray(result.probabilities), window), None
        if timeout_s <= 0:
            raise TimeoutError
        cal = CalibrationInput(result.model_version, result.bundle_uri, result.logits)
        t0 = time.perf_counter()
        probs = np.asarray(await call_with_timeout(self.down.calibrate, cal, timeout_s))
        return _check_probabilities(probs, window), (time.perf_counter() - t0) * 1000

    def _fallback(self, n: int, reason: str, error: BaseException) -> _Outcome:
        self.stats.fallbacks[reason] += 1
        self.metrics.fallback(reason)
        self.warnings.log(reason, "scoring failed; answered in upstream order (fallback)", error)
        return _Outcome(upstream_order(n), fallback=reason)

    def _record(self, request_id, req, decision, arm, cfg, out: _Outcome, latency_ms: float) -> None:
        s = self.stats
        s.served += 1
        s.by_arm[arm] += 1
        s.latencies_ms.append(latency_ms)
        if out.logits is not None:
            s.reranked += 1
        outcome = "fallback" if out.fallback else ("reranked" if out.logits is not None else "upstream")
        self.metrics.request(arm, outcome, latency_ms)
        now = self.clock()
        if out.model_version is not None:
            s.by_model[out.model_version] += 1
            self.metrics.response_model(out.model_version)
            if arm != "control":
                s.versions.add(out.model_version, now)
        if s.recent.add(now, arm, out.fallback is not None):  # a new second: refresh the window gauges
            self.metrics.window(s.recent.ratios(), len(s.versions.recent(now)))
            # and the routing gauges: set only at reconfigure, they were missing from a scrape taken
            # minutes after the deploy (the full test run); re-set each second they stay exported.
            self.metrics.routing(cfg)
        self.exposure.write(
            {
                "event": "exposure",
                "ts": round(now, 3),
                "request_id": request_id,
                "query_id": req.query_id,
                "unit": decision.unit,
                "bucket": decision.bucket,
                "arm": arm,
                "shadow": cfg.shadow_mode,
                "experiment_salt": cfg.experiment_salt,
                "rollout_percentage": cfg.rollout_percentage,
                "model_version": out.model_version,
                "fallback": out.fallback,
                "calibrated": out.probabilities is not None,
                "n_candidates": len(req.ids),
                "window": req.window,
                "latency_ms": round(latency_ms, 3),
            }
        )

    def _log_decision(
        self, request_id, req, decision, arm, cfg, out: _Outcome, latency_ms: float, results, merged=None
    ) -> None:
        # Not awaited: the rerank response does not wait for the fsync. What a kill can lose is what
        # was queued and not yet committed (the log's commit latency; see eventlog's contract).
        record = Decision(
            request_id=request_id,
            unit_id=decision.unit,
            query_id=req.query_id,
            bucket=decision.bucket,
            arm=arm,
            experiment_salt=cfg.experiment_salt,
            rollout_percentage=cfg.rollout_percentage,
            shadow=cfg.shadow_mode,
            model_id=out.model_version,
            calibrator_version=out.model_version if out.probabilities is not None else None,
            ts=round(self.clock(), 6),
            latency_ms=round(latency_ms, 3),
            fallback_reason=out.fallback,
            n_candidates=len(req.ids),
            window=req.window,
            items=displayed_items(results, merged),
            mode="interleave" if merged is not None else "ab",
        ).record()
        try:
            self.events.append_nowait("decision", [record])
        except Exception as e:  # a closed log while shutting down: the response still goes out
            self.stats.event_log_errors += 1
            self.warnings.log("event_log_decision", "decision record not logged", e)

    # -------------------------------------------------------------- POST /v1/feedback

    async def handle_feedback(self, request: Any) -> tuple[int, dict[str, Any]]:
        """`POST /v1/feedback`: 200 ``{"accepted", "duplicates"}`` once the new events are fsync'ed.

        4xx for bad input (the field named), 413 for too large, 404 when no event log is configured,
        503 ``log_unavailable`` when the log failed to write (nothing acknowledged: retry the batch).
        """
        self.stats.feedback["batches"] += 1
        if self.events is None:
            self.stats.feedback["disabled"] += 1
            return 404, error_body("not_found", "feedback is off: set args.event_log.uri to enable it")
        try:
            body = await read_body(request, self.args.event_log.max_body_bytes)
            events = self._parse_feedback(body)
        except RequestError as e:
            self.stats.feedback[f"rejected:{e.code}"] += 1
            self.metrics.feedback("rejected", "-", 1)
            return e.status, e.body()
        fresh, duplicates = split_new(events, self.recent_ids)
        now = self.clock()
        records = [feedback_record(ev, received_at=now, replica=self.replica["id"]) for ev in fresh]
        try:
            if records:
                await self.events.append_async("feedback", records)
        except Exception as e:  # not bad input and not acknowledged: the client retries
            self.stats.event_log_errors += 1
            self.warnings.log("event_log_feedback", "feedback batch not logged; answered 503", e)
            return 503, error_body("log_unavailable", f"the event log could not write: {exception_name(e)}")
        self.recent_ids.add_all([ev["event_id"] for ev in fresh])
        self._count_feedback(events, fresh, duplicates)
        return 200, {"accepted": len(fresh), "duplicates": duplicates}

    def _parse_feedback(self, body: bytes) -> list[dict[str, Any]]:
        try:
            return self.feedback_parser.parse(body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        except FeedbackError as e:
            raise RequestError(e.code, e.message, e.field) from None

    def _count_feedback(self, events: list[dict[str, Any]], fresh: list[dict[str, Any]], duplicates: int) -> None:
        s = self.stats.feedback
        s["accepted"] += len(fresh)
        s["duplicates"] += duplicates
        by_type: dict[str, int] = {}
        for ev in fresh:
            by_type[ev["type"]] = by_type.get(ev["type"], 0) + 1
        for t, n in by_type.items():
            self.metrics.feedback("accepted", t, n)
        if duplicates:
            fresh_ids = {id(ev) for ev in fresh}
            dup_types: dict[str, int] = {}
            for ev in events:
                if id(ev) not in fresh_ids:
                    dup_types[ev["type"]] = dup_types.get(ev["type"], 0) + 1
            for t, n in dup_types.items():
                self.metrics.feedback("duplicate", t, n)

    # -------------------------------------------------------------- GET /v1/experiments/{id}

    async def experiment(self, experiment_id: str) -> tuple[int, dict[str, Any]]:
        """The experiment's report (`experiments.report`) over the whole event log, every router's
        closed and open segments (on ``s3://``, the segments uploaded so far); 404 without a log or
        without a decision for `experiment_id` (the routing config's experiment_salt).

        DuckDB runs in a worker thread, so this replica keeps serving; for a large log, run
        ``python -m cotrr_ray.experiments report`` offline instead.
        """
        if self.events is None:
            return 404, error_body("not_found", "no event log: set args.event_log.uri to record experiments")
        if not experiment_id or len(experiment_id) > 256:
            return 422, error_body("invalid_request", "experiment id must be 1-256 characters", "experiment_id")
        await asyncio.to_thread(self.events.flush)  # this replica's own latest decisions are included
        report = await asyncio.to_thread(experiment_report, self.args.event_log.uri, experiment_id)
        if report is None:
            return 404, error_body("not_found", f"no decision of experiment {experiment_id!r} in the event log")
        return 200, report

    # -------------------------------------------------------------- GET /experiments/{id} (HTML)

    async def experiment_page(self, experiment_id: str) -> tuple[int, str]:
        """The experiment page (`experiments.page`): the report above and, when a controller runs the
        experiment, its status beside the event log. Errors are those of `experiment`, as HTML."""
        code, report = await self.experiment(experiment_id)
        if code != 200:
            return code, render_error(code, report)

        def page() -> str:
            status, problem = load_status(self.args.event_log.uri, experiment_id)
            return render_page(report, status, status_problem=problem)

        return 200, await asyncio.to_thread(page)

    # -------------------------------------------------------------- shadow

    def _spawn_shadow(self, request_id: str, req: ParsedRequest, control_order: np.ndarray, cfg: RoutingConfig) -> None:
        """Score the treatment in the background: bounded, counted, never awaited by the response."""
        if self._shadow_in_flight >= cfg.max_shadow_in_flight:
            self.stats.shadow["dropped"] += 1
            self.metrics.shadow("dropped", None, None)
            return
        if not self.shadow_breaker.allow():  # last: an allowed probe is always sent, so it always reports
            self.stats.shadow["paused"] += 1
            self.metrics.shadow("paused", None, None)
            return
        self._shadow_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(request_id, req, control_order, cfg))
        self._background.add(task)  # strong reference until done
        task.add_done_callback(self._background.discard)

    async def _shadow(self, request_id: str, req: ParsedRequest, control_order: np.ndarray, cfg: RoutingConfig) -> None:
        t0 = time.perf_counter()
        try:
            result = await call_with_timeout(self.down.score, req.inputs, cfg.shadow_timeout_ms / 1000)
            result = _check_logits(result, req.window)
            treatment_order = model_order(result.logits, len(req.ids))
            comparison = agreement(req.ids, control_order, treatment_order, req.window)
            latency_ms = (time.perf_counter() - t0) * 1000
            s = self.stats
            s.shadow["ok"] += 1
            s.shadow_tau_sum += comparison["kendall_tau"]
            s.shadow_overlap_sum += comparison["overlap_at_10"]
            s.shadow_latencies_ms.append(latency_ms)
            s.last_shadow = {"request_id": request_id, "model_version": result.model_version, **comparison}
            now = self.clock()
            s.versions.add(result.model_version, now)
            self.metrics.shadow("ok", comparison, latency_ms)
            self.shadow_breaker.record(True)
            self.exposure.write(
                {
                    "event": "shadow_comparison",
                    "ts": round(now, 3),
                    "request_id": request_id,
                    "model_version": result.model_version,
                    **comparison,
                    "latency_ms": round(latency_ms, 3),
                }
            )
        except TimeoutError as e:
            self._shadow_failed("timeout", "shadow_timeout", "shadow scoring timed out", e, None)
        except Exception as e:  # swallowed, counted and logged: the shadow never affects responses
            self._shadow_failed("error", f"shadow_error:{exception_name(e)}", "shadow scoring failed", e, False)
        finally:
            self._shadow_in_flight -= 1

    def _shadow_failed(self, outcome: str, reason: str, what: str, error: BaseException, ok: bool | None) -> None:
        self.stats.shadow[outcome] += 1
        self.metrics.shadow(outcome, None, None)
        self.warnings.log(reason, f"{what} (the response was not affected)", error)
        if self.shadow_breaker.record(ok):
            pause = f"shadow paused for {SHADOW_PAUSE_S:.0f} s after {self.shadow_breaker.failures} failures in a row"
            self.warnings.log("shadow_paused", pause, error)

    async def drain(self) -> None:
        """Wait for background shadow tasks (tests, graceful shutdown)."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -------------------------------------------------------------- GET endpoints

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """A real multi-candidate inference through every scorer and the calibrator; no stats touched."""
        timeout_s = max(self.config.timeout_ms / 1000, 1.0)
        checks: dict[str, Any] = {}
        scorers = [("scorer", self.down.score)]
        if self.down.score_control is not None:
            scorers.append(("control_scorer", self.down.score_control))
        cl = self._health_list
        for name, score in scorers:
            try:
                result = _check_logits(await call_with_timeout(score, cl, timeout_s), cl.window)
                checks[name] = {"ok": True, "model_version": result.model_version}
            except Exception as e:
                checks[name] = {"ok": False, "error": f"{exception_name(e)}: {e}"[:500]}
                continue
            try:
                await self._calibrate(result, cl.window, timeout_s)
                checks.setdefault("calibrator", {"ok": True})
            except Exception as e:
                checks["calibrator"] = {"ok": False, "error": f"{exception_name(e)}: {e}"[:500]}
        healthy = all(c["ok"] for c in checks.values()) and "calibrator" in checks
        return healthy, {"status": "ok" if healthy else "unavailable", "checks": checks}

    async def model_info(self) -> dict[str, Any]:
        async def info(fn: DownstreamCall | None) -> dict[str, Any] | None:
            if fn is None:
                return None
            try:
                return await call_with_timeout(fn, None, 2.0)
            except Exception as e:
                return {"error": f"{exception_name(e)}: {e}"[:500]}

        treatment, control = await asyncio.gather(info(self.down.info), info(self.down.info_control))
        return {
            "model_version": (treatment or {}).get("bundle_id"),
            "control_model_version": (control or {}).get("bundle_id") if control else None,
            "feature_spec": {
                "version": self.meta.spec.version,
                "candidate": self.meta.spec.candidate,
                "query": self.meta.spec.query,
                "fingerprint": self.meta.spec.fingerprint(),
            },
            "top_m": {"default": self.default_top_m, "max": self.max_top_m},
            "max_candidates": self.args.max_candidates,
            "max_body_bytes": self.args.max_body_bytes,
            "relevance_threshold": (treatment or {}).get("relevance_threshold", self.meta.relevance_threshold),
            "probability": "calibrated P(label >= relevance_threshold) for reranked candidates",
            "routing": self.config.model_dump(),
            "scorer": treatment,
            "control_scorer": control,
        }

    def stats_snapshot(self) -> dict[str, Any]:
        return {
            **self.stats.snapshot(self.clock()),
            "model_version": self._model_version,
            "routing": self.config.model_dump(),
            "replica": self.replica,
            "shadow_in_flight": self._shadow_in_flight,
        }
