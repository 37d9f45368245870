"""The router's logic as a plain object (no Ray): `cotrr_ray.deployments.Router` wraps it.

`RerankService` assigns the arm, calls scorer and calibrator through injected async callables
with a bounded budget, orders the list, falls back to upstream order on any downstream failure,
runs shadow scoring in the background, keeps stats and writes exposure records. It never imports
torch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from cotrr_ray.api import ParsedRequest, RequestParser
from cotrr_ray.bundle import BundleMeta
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.errors import RequestError
from cotrr_ray.ranking import agreement, build_results, model_order, upstream_order
from cotrr_ray.routing import decide
from cotrr_ray.scorer import CalibrationInput, ScoreResult, synthetic_list

logger = logging.getLogger(__name__)


Call = Callable[[Any], Awaitable[Any]]


@dataclass
class Downstream:
    """How the router reaches the other deployments (handle calls in Serve, fakes in tests).

    Each callable returns an awaitable; if it also has `cancel()` (a Serve `DeploymentResponse`),
    it is cancelled when its budget runs out.
    """

    score: Call  # CandidateList -> ScoreResult
    calibrate: Call | None  # CalibrationInput -> (window,) probabilities; None: the scorer calibrates (fused)
    info: Call  # None -> dict
    score_control: Call | None = None
    info_control: Call | None = None


async def call_with_timeout(fn: Call, arg: Any, timeout_s: float) -> Any:
    """Await `fn(arg)` for at most `timeout_s`; cancel the downstream request on timeout.

    `asyncio.timeout` (not `wait_for`): no extra task and no extra loop iteration per call.
    """
    response = fn(arg)
    try:
        async with asyncio.timeout(timeout_s):
            return await response
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError on Python >= 3.11
        cancel = getattr(response, "cancel", None)
        if callable(cancel):
            cancel()
        raise


class Coalescer:
    """Merges concurrent one-item downstream calls into one call that carries a list.

    Every hop between deployments has a fixed cost (serialisation, the transport, Serve's request
    bookkeeping on both sides) that dwarfs the per-item work of a batched scorer or an isotonic
    table; coalescing pays it once per batch instead of once per request.

    `send_many(items)` returns an awaitable (a Serve `DeploymentResponse`) of a list with one entry
    per item; an entry that is an exception fails only its own item, an exception raised by the
    call fails them all. Calling the coalescer with one item returns an `asyncio.Future` (awaitable,
    with `cancel()`), so it drops in wherever a handle method was called per item.

    Policy, no timer: items submitted in the same event-loop iteration travel together, and while
    `max_in_flight` calls are outstanding new items wait and leave together (at most `max_items`
    per call) as soon as one returns. A lone request is sent at once and pays no batching wait;
    under load batches grow to what arrived during one downstream round trip. A cancelled item
    (its caller timed out) is never sent; a call whose items were all cancelled is cancelled.
    """

    def __init__(self, send_many: Call, *, max_items: int = 16, max_in_flight: int = 2):
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("max_items and max_in_flight must be >= 1")
        self._send_many = send_many
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # downstream calls made
        self.items = 0  # items they carried

    def configure(self, *, max_items: int, max_in_flight: int) -> None:
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("max_items and max_in_flight must be >= 1")
        self.max_items, self.max_in_flight = max_items, max_in_flight

    def __call__(self, item: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut))
        self._schedule(loop)
        return fut

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "items": self.items,
            "mean_items_per_call": round(self.items / self.calls, 3) if self.calls else None,
            "in_flight": self._in_flight,
            "pending": len(self._pending),
            "max_items": self.max_items,
            "max_in_flight": self.max_in_flight,
        }

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self.max_in_flight:
            batch = []
            while self._pending and len(batch) < self.max_items:
                item, fut = self._pending.popleft()
                if not fut.done():  # cancelled while waiting: never sent
                    batch.append((item, fut))
            if batch:
                self._in_flight += 1
                task = loop.create_task(self._send(batch))
                self._tasks.add(task)  # strong reference until done
                task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        futures = [f for _, f in batch]
        self.calls += 1
        self.items += len(batch)
        returned = False
        try:
            response = self._send_many([item for item, _ in batch])
            cancel = getattr(response, "cancel", None)
            if callable(cancel):

                def cancel_if_abandoned(_: asyncio.Future) -> None:
                    if not returned and all(f.done() for f in futures):
                        cancel()

                for f in futures:
                    f.add_done_callback(cancel_if_abandoned)
            results = await response
            returned = True
            if len(results) != len(batch):
                raise InvalidOutput(f"{len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            returned = True
            for f in futures:
                f.cancel()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself is being cancelled (shutdown)
            # otherwise every caller gave up and we cancelled the call: nothing to deliver
        except Exception as e:
            returned = True
            for f in futures:
                if not f.done():
                    f.set_exception(e)
        else:
            for f, r in zip(futures, results):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)
        finally:
            self._in_flight -= 1
            if self._pending:
                self._schedule(asyncio.get_running_loop())


def exception_name(e: BaseException) -> str:
    """The user-level exception type: Ray wraps remote errors (`RayTaskError(X)`, `.cause`)."""
    cause = getattr(e, "cause", None)
    return type(cause).__name__ if isinstance(cause, BaseException) else type(e).__name__


@dataclass(slots=True)
class StageTimings:
    """Wall times (ms) of one rerank request's stages, as the router sees them; None: did not happen.

    Filled by `RerankService.rerank` (and `read` by the HTTP layer before it) and sent back as the W3C
    `Server-Timing` response header, so a client or a browser's devtools sees where a request's time
    went. A stage is recorded only when it succeeded: a fallback carries `parse` and `total` only.

    - read: the request body received from the ASGI stream (HTTP layer, before `total` starts);
    - parse: body -> validated `ParsedRequest` (`RequestParser.parse`);
    - score: the scorer call's round trip from the router (the coalescer's wait for a free call slot,
      the handle hop, the @serve.batch queue, the model); an in-process call in the peer;
    - model: the scorer's own compute for the batch that held this window (`ScoreResult.compute_ms`;
      the whole batch's time, so `score - model` is transport and queueing);
    - calibrate: the calibrator call's round trip (absent in fused mode: the scorer calibrates);
    - total: the router's handling time, parse to response payload (exposure record and metrics included).
    """

    read: float | None = None
    parse: float | None = None
    score: float | None = None
    model: float | None = None
    calibrate: float | None = None
    total: float | None = None

    def header(self) -> str:
        """The `Server-Timing` value: `parse;dur=1.234, score;dur=3.100, ..., total;dur=6.200`."""
        return ", ".join(f"{name};dur={v:.3f}" for name in _STAGES if (v := getattr(self, name)) is not None)


_STAGES = tuple(StageTimings.__dataclass_fields__)
SERVER_TIMING = "Server-Timing"


def parse_server_timing(value: str) -> dict[str, float]:
    """`{name: dur}` of a `Server-Timing` header value (entries without a `dur` are left out)."""
    out = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, v = param.partition("=")
            if key.strip().lower() == "dur" and name:
                out[name] = float(v.strip().strip('"'))
    return out


class Metrics(Protocol):
    def request(self, arm: str, outcome: str, latency_ms: float) -> None: ...
    def rejected(self, code: str) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def calibration_failure(self, reason: str) -> None: ...
    def shadow(self, outcome: str, comparison: dict[str, float] | None, latency_ms: float | None) -> None: ...
    def routing(self, config: RoutingConfig) -> None: ...


class NullMetrics(Metrics):
    """Records nothing: the protocol's methods, inherited as they are (outside Ray, in tests and the peer)."""


class ExposureLog:
    """One JSON line per decision: to a file (append) or through the Serve replica logger."""

    def __init__(self, path: str | None = None, log: logging.Logger | None = None):
        self._log = log or logging.getLogger("ray.serve")
        self._file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # line-buffered; O_APPEND lines do not interleave

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record).decode()
        if self._file is not None:
            self._file.write(line + "\n")
        else:
            self._log.info(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class ServingStats:
    """Counters of one router replica (GET /v1/stats)."""

    requests: int = 0
    served: int = 0
    reranked: int = 0
    by_arm: collections.Counter = field(default_factory=collections.Counter)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    calibration_failures: collections.Counter = field(default_factory=collections.Counter)
    shadow: collections.Counter = field(default_factory=collections.Counter)
    shadow_tau_sum: float = 0.0
    shadow_overlap_sum: float = 0.0
    last_shadow: dict[str, Any] | None = None
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    shadow_latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))

    @staticmethod
    def _percentiles(values: collections.deque) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        p = np.percentile(np.fromiter(values, float), [50, 95, 99])
        return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}

    def snapshot(self) -> dict[str, Any]:
        ok = self.shadow["ok"]
        return {
            "requests": self.requests,
            "served": self.served,
            "reranked": self.reranked,
            "by_arm": dict(self.by_arm),
            "fallbacks": dict(self.fallbacks),
            "rejected": dict(self.rejected),
            "calibration_failures": dict(self.calibration_failures),
            "error_rate": (sum(self.fallbacks.values()) / self.served) if self.served else 0.0,
            "reject_rate": (sum(self.rejected.values()) / self.requests) if self.requests else 0.0,
            "latency_ms": {**self._percentiles(self.latencies_ms), "window": len(self.latencies_ms)},
            "shadow": {
                "comparisons": ok,
                "errors": self.shadow["error"],
                "timeouts": self.shadow["timeout"],
                "dropped": self.shadow["dropped"],
                "mean_kendall_tau": self.shadow_tau_sum / ok if ok else None,
                "mean_overlap_at_10": self.shadow_overlap_sum / ok if ok else None,
                "latency_ms": self._percentiles(self.shadow_latencies_ms),
                "last": self.last_shadow,
            },
        }


@dataclass
class _Outcome:
    order: np.ndarray
    logits: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    model_version: str | None = None
    fallback: str | None = None


class InvalidOutput(ValueError):
    """A downstream deployment answered with something unusable (wrong shape, NaN, out of range)."""


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
    ):
        self.meta = meta
        self.args = args
        self.down = downstream
        self.max_top_m = max_top_m or meta.top_m
        self.parser = RequestParser(meta.spec, max_top_m=self.max_top_m, max_candidates=args.max_candidates)
        self.metrics: Metrics = metrics or NullMetrics()
        self.exposure = exposure or ExposureLog(None)
        self.stats = ServingStats()
        self.replica = {"id": uuid.uuid4().hex, "pid": os.getpid(), "started_at": time.time()}
        self._model_version = meta.bundle_id  # last treatment version seen (changes on hot swap)
        self._background: set[asyncio.Task] = set()
        self._shadow_in_flight = 0
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

    async def rerank(
        self, body: bytes, request_id: str | None = None, timings: StageTimings | None = None
    ) -> dict[str, Any]:
        """The response payload; `timings`, when given, receives the stage times (Server-Timing)."""
        t0 = time.perf_counter()
        tm = timings if timings is not None else StageTimings()
        cfg = self.config
        request_id = request_id or uuid.uuid4().hex
        self.stats.requests += 1
        try:
            req = self.parser.parse(body, default_top_m=self.default_top_m)
        except RequestError as e:
            self._count_rejected(e)
            raise
        tm.parse = (time.perf_counter() - t0) * 1000
        decision = decide(
            req.unit_id, req.query_id, salt=cfg.experiment_salt, rollout_percentage=cfg.rollout_percentage
        )
        arm = "control" if cfg.shadow_mode else decision.arm
        n = len(req.ids)
        if arm == "treatment":
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

    def note_rejected(self, e: RequestError) -> None:
        """Count a request refused before `rerank` saw it (e.g. an oversized body)."""
        self.stats.requests += 1
        self._count_rejected(e)

    def _count_rejected(self, e: RequestError) -> None:
        self.stats.rejected[e.code] += 1
        self.metrics.rejected(e.code)

    async def _score(
        self, score: Call, req: ParsedRequest, timeout_s: float, who: str, timings: StageTimings
    ) -> _Outcome:
        """Scorer then calibrator within one budget; upstream order on any scorer failure."""
        start = time.perf_counter()
        n = len(req.ids)
        try:
            result = _check_logits(await call_with_timeout(score, req.inputs, timeout_s), req.window)
        except TimeoutError:
            return self._fallback(n, f"{who}_timeout")
        except Exception as e:  # any downstream failure: serve the upstream order, flagged
            return self._fallback(n, f"{who}_error:{exception_name(e)}")
        scored = time.perf_counter()
        timings.score = (scored - start) * 1000
        timings.model = result.compute_ms
        if who == "scorer":
            self._model_version = result.model_version
        out = _Outcome(model_order(result.logits, n), logits=result.logits, model_version=result.model_version)
        remaining = timeout_s - (scored - start)
        reason = None
        cal_ms = None  # stays None in fused mode (no calibrator call)
        try:
            if result.probabilities is not None or self.down.calibrate is None:  # fused: calibrated by the scorer
                if result.probabilities is None:
                    raise InvalidOutput("the scorer returned no probabilities and there is no calibrator")
                probs = np.asarray(result.probabilities)
            else:
                if remaining <= 0:
                    raise TimeoutError
                cal = CalibrationInput(result.model_version, result.bundle_path, result.logits)
                t_cal = time.perf_counter()
                probs = np.asarray(await call_with_timeout(self.down.calibrate, cal, remaining))
                cal_ms = (time.perf_counter() - t_cal) * 1000
            if probs.shape != (req.window,) or not (
                np.isfinite(probs).all() and (0 <= probs).all() and (probs <= 1).all()
            ):
                raise InvalidOutput(f"calibrator returned probabilities of shape {probs.shape} outside [0, 1]")
            out.probabilities = probs
            timings.calibrate = cal_ms
        except TimeoutError:
            reason = "calibrator_timeout"
        except Exception as e:  # ordered by the scorer anyway; probabilities are null
            reason = f"calibrator_error:{exception_name(e)}"
        if reason is not None:
            self.stats.calibration_failures[reason] += 1
            self.metrics.calibration_failure(reason)
        return out

    def _fallback(self, n: int, reason: str) -> _Outcome:
        self.stats.fallbacks[reason] += 1
        self.metrics.fallback(reason)
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
        self.exposure.write(
            {
                "event": "exposure",
                "ts": round(time.time(), 3),
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

    # -------------------------------------------------------------- shadow

    def _spawn_shadow(self, request_id: str, req: ParsedRequest, control_order: np.ndarray, cfg: RoutingConfig) -> None:
        """Score the treatment in the background: bounded, counted, never awaited by the response."""
        if self._shadow_in_flight >= cfg.max_shadow_in_flight:
            self.stats.shadow["dropped"] += 1
            self.metrics.shadow("dropped", None, None)
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
            self.metrics.shadow("ok", comparison, latency_ms)
            self.exposure.write(
                {
                    "event": "shadow_comparison",
                    "ts": round(time.time(), 3),
                    "request_id": request_id,
                    "model_version": result.model_version,
                    **comparison,
                    "latency_ms": round(latency_ms, 3),
                }
            )
        except TimeoutError:
            self.stats.shadow["timeout"] += 1
            self.metrics.shadow("timeout", None, None)
        except Exception as e:  # swallowed and counted: the shadow never affects responses
            self.stats.shadow["error"] += 1
            self.metrics.shadow("error", None, None)
            logger.debug("shadow scoring failed for %s: %r", request_id, e)
        finally:
            self._shadow_in_flight -= 1

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
                if result.probabilities is not None or self.down.calibrate is None:  # fused
                    if result.probabilities is None:
                        raise InvalidOutput("the scorer returned no probabilities and there is no calibrator")
                    probs = np.asarray(result.probabilities)
                else:
                    cal = CalibrationInput(result.model_version, result.bundle_path, result.logits)
                    probs = np.asarray(await call_with_timeout(self.down.calibrate, cal, timeout_s))
                if probs.shape != (cl.window,) or not ((0 <= probs).all() and (probs <= 1).all()):
                    raise InvalidOutput(f"probabilities of shape {probs.shape} outside [0, 1]")
                checks.setdefault("calibrator", {"ok": True})
            except Exception as e:
                checks["calibrator"] = {"ok": False, "error": f"{exception_name(e)}: {e}"[:500]}
        healthy = all(c["ok"] for c in checks.values()) and "calibrator" in checks
        return healthy, {"status": "ok" if healthy else "unavailable", "checks": checks}

    async def model_info(self) -> dict[str, Any]:
        async def info(fn: Call | None) -> dict[str, Any] | None:
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
            **self.stats.snapshot(),
            "model_version": self._model_version,
            "routing": self.config.model_dump(),
            "replica": self.replica,
            "shadow_in_flight": self._shadow_in_flight,
        }
