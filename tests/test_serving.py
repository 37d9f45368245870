"""The router, scorer and calibrator logic without Ray (cotrr_ray.serving.service, .scorer), on real tiny bundles.

Downstream deployments are replaced by local async callables that return awaitables with a
`cancel()` method, like Serve's DeploymentResponse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import shutil
import time

import numpy as np
import orjson
import pytest
from _bundles import TOP_M, make_bundle, request_body

from cotrr_ray.bundles.bundle import Bundle, BundleError, read_meta
from cotrr_ray.bundles.registry import resolve_uri
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.experiments.assignment import decide
from cotrr_ray.experiments.events import displayed_rows
from cotrr_ray.serving.coalescer import Breaker, Coalescer, Downstream, answer_each
from cotrr_ray.serving.errors import RequestError, exception_name
from cotrr_ray.serving.observability import ExposureLog, ModelVersions, NullMetrics, RateLimitedLog, RecentTraffic
from cotrr_ray.serving.scorer import CalibrationInput, CalibratorCore, ScorerCore, ScoreResult, synthetic_list
from cotrr_ray.serving.service import SHADOW_MAX_FAILURES, SHADOW_PAUSE_S, RerankService
from cotrr_ray.serving.timing import StageTimings, parse_server_timing
from cotrr_ray.storage import StorageError

RESPONSE_KEYS = {"request_id", "model_version", "arm", "shadow", "fallback", "calibrated", "results"}
RESULT_KEYS = {"id", "index", "rank", "score", "probability", "reranked"}


class FakeResponse:
    """An awaitable with cancel(), standing in for a Serve DeploymentResponse."""

    def __init__(self, coro):
        self._task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class Local:
    """A downstream method: runs `fn` after `delay` s, or raises `error`; records calls."""

    def __init__(self, fn=None, *, delay: float = 0.0, error: Exception | None = None):
        self.fn, self.delay, self.error = fn, delay, error
        self.calls = 0
        self.responses: list[FakeResponse] = []

    def __call__(self, arg):
        self.calls += 1

        async def run():
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.error is not None:
                raise self.error
            return self.fn(arg)

        r = FakeResponse(run())
        self.responses.append(r)
        return r


@pytest.fixture(scope="module")
def scorer_a(bundle_a) -> ScorerCore:
    return ScorerCore.load(str(bundle_a))


@pytest.fixture(scope="module")
def scorer_b(bundle_b) -> ScorerCore:
    return ScorerCore.load(str(bundle_b))


@pytest.fixture(scope="module")
def calibrators(bundle_a, bundle_b) -> CalibratorCore:
    core = CalibratorCore()
    core.add(str(bundle_a))
    core.add(str(bundle_b))
    return core


def score_with(core: ScorerCore) -> Local:
    return Local(lambda cl: core.score([cl])[0])


def make_service(
    bundle_a,
    scorer_a,
    calibrators,
    *,
    routing: RoutingConfig | None = None,
    score=None,
    calibrate=None,
    control=None,
    exposure_path=None,
    metrics=None,
    **args,
) -> RerankService:
    score = score or score_with(scorer_a)
    calibrate = calibrate or Local(calibrators.transform)
    down = Downstream(
        score=score,
        calibrate=calibrate,
        info=Local(lambda _: scorer_a.info()),
        score_control=control,
        info_control=Local(lambda _: {"bundle_id": "control"}) if control else None,
    )
    app_args = AppArgs(bundle_uri=str(bundle_a), routing=routing or RoutingConfig(rollout_percentage=100), **args)
    return RerankService(read_meta(bundle_a), app_args, down, metrics=metrics, exposure=ExposureLog(exposure_path))


def rerank(service: RerankService, body: dict) -> dict:
    return asyncio.run(service.rerank(orjson.dumps(body)))


@pytest.fixture()
def service(bundle_a, scorer_a, calibrators) -> RerankService:
    return make_service(bundle_a, scorer_a, calibrators)


def assert_upstream(resp: dict, body: dict) -> None:
    assert [r["id"] for r in resp["results"]] == [c["id"] for c in body["candidates"]]
    assert all(not r["reranked"] and r["score"] is None and r["probability"] is None for r in resp["results"])


# ----------------------------------------------------------------------------- contract and ordering


def test_treatment_contract_and_ordering(service, scorer_a, records) -> None:
    body = request_body(records[120], encoding="list")
    resp = rerank(service, body)
    assert set(resp) == RESPONSE_KEYS and all(set(r) == RESULT_KEYS for r in resp["results"])
    assert resp["arm"] == "treatment" and resp["fallback"] is None and resp["calibrated"] and not resp["shadow"]
    assert resp["model_version"] == scorer_a.bundle.bundle_id
    res = resp["results"]
    n = len(body["candidates"])
    assert len(res) == n and [r["rank"] for r in res] == list(range(n))
    head, tail = res[:TOP_M], res[TOP_M:]
    assert sorted(r["index"] for r in head) == list(range(TOP_M)) and all(r["reranked"] for r in head)
    assert [r["index"] for r in tail] == list(range(TOP_M, n))  # tail passthrough, upstream order
    assert all(r["score"] is None and r["probability"] is None and not r["reranked"] for r in tail)
    for a, b in zip(head[:-1], head[1:]):
        assert a["score"] > b["score"] or (a["score"] == b["score"] and a["index"] < b["index"])
        assert a["probability"] >= b["probability"]  # isotonic: monotone in the logit
    assert all(0.0 <= r["probability"] <= 1.0 for r in head)
    # Scores are the bundle's own logits for the window.
    req = service.parser.parse(orjson.dumps(body), default_top_m=TOP_M)
    logits = Bundle.load(scorer_a.bundle.path).score([req.inputs])[0]
    by_index = {r["index"]: r["score"] for r in head}
    np.testing.assert_allclose([by_index[i] for i in range(TOP_M)], logits, rtol=1e-5, atol=1e-6)


def test_top_m_and_top_n(service, records) -> None:
    body = request_body(records[121], top_m=3, top_n=5)
    res = rerank(service, body)["results"]
    assert len(res) == 5
    assert [r["reranked"] for r in res] == [True, True, True, False, False]
    assert sorted(r["index"] for r in res[:3]) == [0, 1, 2] and [r["index"] for r in res[3:]] == [3, 4]


def test_base64_and_list_bodies_score_identically(service, records) -> None:
    a = rerank(service, request_body(records[122], encoding="list"))["results"]
    b = rerank(service, request_body(records[122], encoding="base64"))["results"]
    assert [(r["id"], r["score"]) for r in a] == [(r["id"], r["score"]) for r in b]


def test_bad_input_raises_request_error_and_is_counted(service, records) -> None:
    body = request_body(records[0])
    body["candidates"][1]["id"] = body["candidates"][0]["id"]
    with pytest.raises(RequestError) as info:
        rerank(service, body)
    assert info.value.status == 422 and info.value.field == "candidates[1].id"
    stats = service.stats_snapshot()
    assert stats["requests"] == 1 and stats["served"] == 0 and stats["rejected"] == {"invalid_request": 1}


# ----------------------------------------------------------------------------- arms


def test_arms_follow_the_routing_contract(bundle_a, scorer_a, calibrators, records) -> None:
    score = score_with(scorer_a)
    cfg = RoutingConfig(rollout_percentage=30, experiment_salt="exp-a")
    service = make_service(bundle_a, scorer_a, calibrators, routing=cfg, score=score)
    body = request_body(records[123], top_m=2)
    arms = {}
    for i in range(200):
        unit = f"user-{i}"
        resp = rerank(service, {**body, "unit_id": unit})
        expected = decide(unit, body["query"]["id"], salt="exp-a", rollout_percentage=30).arm
        assert resp["arm"] == expected
        arms[unit] = expected
        if expected == "control":  # no control bundle: upstream order, no model call
            assert resp["model_version"] is None and not resp["calibrated"] and resp["fallback"] is None
            assert_upstream(resp, body)
    n_treat = sum(a == "treatment" for a in arms.values())
    assert score.calls == n_treat and 30 < n_treat < 90
    # Sticky across requests, and raising the rollout never moves a unit out of treatment.
    service.configure(cfg.model_copy(update={"rollout_percentage": 60}))
    for unit, arm in list(arms.items())[:60]:
        again = rerank(service, {**body, "unit_id": unit})["arm"]
        assert arm == "control" or again == "treatment"
    stats = service.stats_snapshot()
    assert stats["by_arm"]["treatment"] + stats["by_arm"]["control"] == stats["served"] == 260


def test_unit_defaults_to_the_query_id(bundle_a, scorer_a, calibrators, records) -> None:
    cfg = RoutingConfig(rollout_percentage=50, experiment_salt="s")
    service = make_service(bundle_a, scorer_a, calibrators, routing=cfg)
    for rec in records[:20]:
        resp = rerank(service, request_body(rec, top_m=1))
        assert resp["arm"] == decide(None, rec["id"], salt="s", rollout_percentage=50).arm


def test_control_bundle_serves_the_control_arm(bundle_a, scorer_a, scorer_b, calibrators, records) -> None:
    service = make_service(
        bundle_a, scorer_a, calibrators, routing=RoutingConfig(rollout_percentage=0), control=score_with(scorer_b)
    )
    resp = rerank(service, request_body(records[124]))
    assert resp["arm"] == "control" and resp["model_version"] == scorer_b.bundle.bundle_id
    assert resp["calibrated"] and resp["results"][0]["reranked"]


# ----------------------------------------------------------------------------- fallbacks


class RemoteError(RuntimeError):
    """Like ray.exceptions.RayTaskError: the user exception is in `.cause`."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


def test_exception_names_unwrap_remote_errors() -> None:
    assert exception_name(RemoteError(KeyError("x"))) == "KeyError"
    assert exception_name(ValueError()) == "ValueError"


@pytest.mark.parametrize(
    "score,reason",
    [
        (Local(error=RuntimeError("boom")), "scorer_error:RuntimeError"),
        (Local(error=RemoteError(MemoryError())), "scorer_error:MemoryError"),
        (Local(lambda cl: ScoreResult(np.full(cl.window, np.nan, np.float32), "v", "p")), "scorer_error:InvalidOutput"),
        (Local(lambda cl: ScoreResult(np.zeros(cl.window + 1, np.float32), "v", "p")), "scorer_error:InvalidOutput"),
    ],
)
def test_scorer_failures_fall_back_to_upstream_order(bundle_a, scorer_a, calibrators, records, score, reason) -> None:
    service = make_service(bundle_a, scorer_a, calibrators, score=score)
    body = request_body(records[125])
    resp = rerank(service, body)
    assert resp["fallback"] == reason and resp["arm"] == "treatment" and not resp["calibrated"]
    assert resp["model_version"] is None
    assert_upstream(resp, body)
    stats = service.stats_snapshot()
    assert stats["fallbacks"] == {reason: 1} and stats["fallback_rate"] == 1.0 and stats["reranked"] == 0


class FakeHttpRequest:
    """A Starlette request as `read_body` sees it: headers and an async body stream."""

    def __init__(self, body: bytes, headers: dict[str, str] | None = None):
        self.headers = {"content-length": str(len(body)), **(headers or {})}
        self._body = body

    async def stream(self):
        yield self._body


def test_a_fallback_counts_in_fallback_rate_not_error_rate(bundle_a, scorer_a, calibrators, records) -> None:
    service = make_service(bundle_a, scorer_a, calibrators, score=Local(error=RuntimeError("boom")))
    assert service.stats_snapshot()["fallback_rate"] == service.stats_snapshot()["error_rate"] == 0.0
    rerank(service, request_body(records[126]))  # fallback: a 200 in upstream order
    service.down.score = score_with(scorer_a)
    for rec in records[127:130]:
        assert rerank(service, request_body(rec))["fallback"] is None
    stats = service.stats_snapshot()
    assert stats["requests"] == stats["served"] == 4 and sum(stats["fallbacks"].values()) == 1
    assert stats["fallback_rate"] == 0.25 and stats["error_rate"] == 0.0 and stats["internal_errors"] == 0


def test_rejected_requests_count_in_error_rate(bundle_a, scorer_a, calibrators, records) -> None:
    service = make_service(bundle_a, scorer_a, calibrators, max_body_bytes=100_000)
    good = orjson.dumps(request_body(records[131]))
    status, payload, timings = asyncio.run(service.handle_http(FakeHttpRequest(good, {"x-request-id": "r-1"})))
    assert status == 200 and payload["request_id"] == "r-1" and timings.read is not None and timings.total > 0
    status, payload, timings = asyncio.run(service.handle_http(FakeHttpRequest(b"{not json")))
    assert status == 422 and payload["error"]["code"] == "invalid_json" and timings is None
    status, payload, _ = asyncio.run(service.handle_http(FakeHttpRequest(b" " * 100_001)))  # refused before parsing
    assert status == 413 and payload["error"]["code"] == "body_too_large"
    stats = service.stats_snapshot()
    assert stats["requests"] == 3 and stats["served"] == 1
    assert stats["rejected"] == {"invalid_json": 1, "body_too_large": 1}
    assert stats["error_rate"] == stats["reject_rate"] == 2 / 3 and stats["fallback_rate"] == 0.0


def test_an_internal_error_counts_in_error_rate_and_propagates(bundle_a, scorer_a, calibrators, records) -> None:
    service = make_service(bundle_a, scorer_a, calibrators)

    def broken_write(record: dict) -> None:
        raise OSError("disk full")

    service.exposure.write = broken_write
    with pytest.raises(OSError, match="disk full"):  # the HTTP layer answers 500
        rerank(service, request_body(records[132]))
    stats = service.stats_snapshot()
    assert stats["requests"] == 1 and stats["internal_errors"] == 1 and stats["rejected"] == {}
    assert stats["error_rate"] == 1.0 and stats["reject_rate"] == 0.0 and stats["fallback_rate"] == 0.0


def test_scorer_timeout_falls_back_fast_and_cancels(bundle_a, scorer_a, calibrators, records) -> None:
    slow = Local(lambda cl: scorer_a.score([cl])[0], delay=2.0)
    service = make_service(
        bundle_a, scorer_a, calibrators, routing=RoutingConfig(rollout_percentage=100, timeout_ms=50), score=slow
    )
    t0 = time.perf_counter()
    resp = rerank(service, request_body(records[126]))
    assert time.perf_counter() - t0 < 1.0
    assert resp["fallback"] == "scorer_timeout" and slow.responses[0].cancelled


@pytest.mark.parametrize(
    "calibrate,reason",
    [
        (Local(error=RuntimeError("x")), "calibrator_error:RuntimeError"),
        (Local(lambda x: np.ones(len(x.logits)), delay=2.0), "calibrator_timeout"),
        (Local(lambda x: np.full(len(x.logits), 2.0)), "calibrator_error:InvalidOutput"),
    ],
)
def test_calibrator_failure_keeps_the_model_order_without_probabilities(
    bundle_a, scorer_a, calibrators, records, calibrate, reason
) -> None:
    routing = RoutingConfig(rollout_percentage=100, timeout_ms=1000)
    service = make_service(bundle_a, scorer_a, calibrators, routing=routing, calibrate=calibrate)
    resp = rerank(service, request_body(records[127]))
    assert resp["fallback"] is None and not resp["calibrated"] and resp["model_version"] is not None
    head = resp["results"][:TOP_M]
    assert all(r["reranked"] and r["score"] is not None and r["probability"] is None for r in head)
    assert [r["score"] for r in head] == sorted((r["score"] for r in head), reverse=True)
    assert service.stats_snapshot()["calibration_failures"] == {reason: 1}


# ----------------------------------------------------------------------------- shadow


def test_shadow_answers_with_control_and_records_a_comparison(
    bundle_a, scorer_a, calibrators, records, tmp_path
) -> None:
    log = tmp_path / "exposure.jsonl"
    routing = RoutingConfig(rollout_percentage=100, shadow_mode=True)
    service = make_service(bundle_a, scorer_a, calibrators, routing=routing, exposure_path=str(log))
    body = request_body(records[128])

    async def go():
        resp = await service.rerank(orjson.dumps(body))
        await service.drain()
        return resp

    resp = asyncio.run(go())
    assert resp["arm"] == "control" and resp["shadow"] and resp["fallback"] is None
    assert_upstream(resp, body)
    shadow = service.stats_snapshot()["shadow"]
    assert shadow["comparisons"] == 1 and -1.0 <= shadow["mean_kendall_tau"] <= 1.0
    assert 0.0 <= shadow["mean_overlap_at_10"] <= 1.0
    assert shadow["last"]["model_version"] == scorer_a.bundle.bundle_id
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["exposure", "shadow_comparison"]
    exposure = events[0]
    assert {"request_id", "unit", "bucket", "arm", "shadow", "model_version", "fallback", "latency_ms"} <= set(exposure)
    assert exposure["arm"] == "control" and exposure["shadow"] is True and exposure["unit"] == body["query"]["id"]


def test_shadow_is_bounded_never_awaited_and_errors_are_swallowed(bundle_a, scorer_a, calibrators, records) -> None:
    slow = Local(lambda cl: scorer_a.score([cl])[0], delay=1.0)
    routing = RoutingConfig(rollout_percentage=100, shadow_mode=True, max_shadow_in_flight=2)
    service = make_service(bundle_a, scorer_a, calibrators, routing=routing, score=slow)
    body = orjson.dumps(request_body(records[129]))

    async def go():
        t0 = time.perf_counter()
        for _ in range(5):
            resp = await service.rerank(body)
            assert resp["arm"] == "control"
        elapsed = time.perf_counter() - t0
        await service.drain()
        return elapsed

    assert asyncio.run(go()) < 0.8  # five responses while the shadow scorer takes 1 s each
    shadow = service.stats_snapshot()["shadow"]
    assert (shadow["comparisons"], shadow["dropped"]) == (2, 3)

    failing = make_service(bundle_a, scorer_a, calibrators, routing=routing, score=Local(error=RuntimeError("x")))

    async def go_failing():
        resp = await failing.rerank(body)
        await failing.drain()
        return resp

    assert asyncio.run(go_failing())["fallback"] is None
    assert failing.stats_snapshot()["shadow"]["errors"] == 1


def test_a_failed_coalesced_call_answers_each_item_with_its_exception_as_a_value() -> None:
    """The Scorer's side of a coalesced call (`answer_each`): a failure comes back as one value per
    item, reported once, instead of one raised (logged, traceback-formatted) exception per call."""
    reported = []

    async def batch(items, error=None):
        if error is not None:
            raise error
        return [i * 10 for i in items]

    async def go(error):
        def score_many(items):
            return asyncio.ensure_future(answer_each(batch(items, error), len(items), reported.append))

        c = Coalescer(score_many, max_items=8)
        return await asyncio.gather(*(c(i) for i in range(5)), return_exceptions=True)

    assert asyncio.run(go(None)) == [0, 10, 20, 30, 40] and reported == []
    out = asyncio.run(go(RuntimeError("model on fire")))
    assert all(type(e) is RuntimeError and str(e) == "model on fire" for e in out) and len(reported) == 1
    values = asyncio.run(answer_each(batch([1, 2, 3], KeyError("v9")), 3, reported.append))
    assert values[0] is values[2] and len(values) == 3 and reported[-1] is values[0]
    # What crosses the handle: one pickled exception (type and args) however many windows share it.
    assert [repr(e) for e in pickle.loads(pickle.dumps(values))] == ["KeyError('v9')"] * 3
    assert len(pickle.dumps(values)) < len(pickle.dumps(KeyError("v9"))) + 16


def test_breaker_pauses_after_consecutive_failures_then_probes_once() -> None:
    clock = FakeClock(0.0)
    b = Breaker(max_failures=3, pause_s=5.0, clock=clock)
    assert not b.record(False) and not b.record(False) and b.allow()
    assert not b.record(True) and b.failures == 0  # a success in between: consecutive count reset
    assert [b.record(False) for _ in range(3)] == [False, False, True] and not b.allow()
    clock.t = 4.9
    assert not b.allow()
    clock.t = 5.0
    assert b.allow() and not b.allow()  # one probe at a time
    assert b.record(False) and not b.allow()  # the probe failed: paused again
    clock.t = 10.0
    assert b.allow() and not b.record(True) and b.allow() and b.allow()  # it succeeded: calls resume
    assert not any(b.record(None) for _ in range(10)) and b.allow()  # timeouts alone never pause
    assert [b.record(False) for _ in range(3)] == [False, False, True]
    clock.t = 15.0
    assert b.allow() and b.record(None) and not b.allow()  # ... but a probe that times out failed
    with pytest.raises(ValueError):
        Breaker(max_failures=0)


def test_a_failing_shadow_is_paused_instead_of_called_on_every_request(bundle_a, scorer_a, calibrators, records):
    failing = Local(error=RuntimeError("shadow down"))
    routing = RoutingConfig(rollout_percentage=100, shadow_mode=True)
    service = make_service(bundle_a, scorer_a, calibrators, routing=routing, score=failing)
    service.shadow_breaker._clock = clock = FakeClock(0.0)
    body = orjson.dumps(request_body(records[146]))

    async def requests(n: int) -> None:
        for _ in range(n):
            assert (await service.rerank(body))["arm"] == "control"
            await service.drain()

    asyncio.run(requests(50))
    shadow = service.stats_snapshot()["shadow"]
    assert failing.calls == SHADOW_MAX_FAILURES and (shadow["errors"], shadow["paused"]) == (SHADOW_MAX_FAILURES, 45)
    clock.t += SHADOW_PAUSE_S
    service.down.score = score_with(scorer_a)  # the treatment recovers: the next probe resumes comparisons
    asyncio.run(requests(10))
    shadow = service.stats_snapshot()["shadow"]
    assert shadow["comparisons"] == 10 and shadow["paused"] == 45


# ----------------------------------------------------------------------------- warnings, windows, model versions


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingMetrics(NullMetrics):
    def __init__(self):
        self.windows: list[tuple[dict[str, float], int]] = []
        self.models: list[str] = []

    def window(self, fallback_ratio: dict[str, float], model_versions: int) -> None:
        self.windows.append((dict(fallback_ratio), model_versions))

    def response_model(self, model_version: str) -> None:
        self.models.append(model_version)


SERVICE_LOG = "cotrr_ray.serving.service"


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == SERVICE_LOG and r.levelno == logging.WARNING]


def test_rate_limited_log_one_record_per_reason_per_interval(caplog) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), interval_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert log.log("a", "it failed", RuntimeError("first"))
        assert not any(log.log("a", "it failed", RuntimeError("again")) for _ in range(9))
        assert log.log("b", "timed out", TimeoutError())  # another reason: its own budget
        clock.t += 59.9
        assert not log.log("a", "it failed", RuntimeError("still"))
        clock.t += 0.2
        assert log.log("a", "it failed", ValueError("later"))
    first, other, later = caplog.records
    assert "RuntimeError: first" in first.getMessage() and "[a]" in first.getMessage()
    assert first.exc_info is not None and first.suppressed == 0  # a real error carries its traceback
    assert other.exc_info is None and "TimeoutError" in other.getMessage()  # a timeout's traceback says nothing
    assert later.suppressed == 10 and "10 more since the last record 60 s ago" in later.getMessage()
    assert "ValueError: later" in later.getMessage()


def test_a_burst_of_scorer_failures_logs_one_warning_per_interval(bundle_a, scorer_a, calibrators, records, caplog):
    service = make_service(bundle_a, scorer_a, calibrators, score=Local(error=RuntimeError("weights on fire")))
    clock = FakeClock()
    service.warnings = RateLimitedLog(logging.getLogger(SERVICE_LOG), interval_s=60, clock=clock)
    body = orjson.dumps(request_body(records[142]))

    async def burst(n: int) -> None:
        for _ in range(n):
            assert (await service.rerank(body))["fallback"] == "scorer_error:RuntimeError"

    with caplog.at_level(logging.WARNING, logger=SERVICE_LOG):
        asyncio.run(burst(100))
        (first,) = warnings_of(caplog)
        clock.t += 61
        asyncio.run(burst(100))
    first, second = warnings_of(caplog)
    for rec in (first, second):
        assert "upstream order" in rec.getMessage() and "RuntimeError: weights on fire" in rec.getMessage()
        assert rec.reason == "scorer_error:RuntimeError" and rec.exc_info is not None
    assert first.suppressed == 0 and second.suppressed == 99 and "99 more" in second.getMessage()
    assert service.stats_snapshot()["fallbacks"] == {"scorer_error:RuntimeError": 200}


def test_calibrator_and_shadow_failures_are_logged_with_the_error(bundle_a, scorer_a, calibrators, records, caplog):
    routing = RoutingConfig(rollout_percentage=100, timeout_ms=1000)
    uncalibrated = make_service(
        bundle_a, scorer_a, calibrators, routing=routing, calibrate=Local(error=KeyError("no table for v9"))
    )
    shadow_routing = RoutingConfig(rollout_percentage=100, shadow_mode=True)
    shadow = make_service(bundle_a, scorer_a, calibrators, routing=shadow_routing, score=Local(error=OSError("gone")))
    body = orjson.dumps(request_body(records[143]))

    async def go() -> None:
        for _ in range(5):
            await uncalibrated.rerank(body)
            await shadow.rerank(body)
            await shadow.drain()

    with caplog.at_level(logging.WARNING, logger=SERVICE_LOG):
        asyncio.run(go())
    by_reason = {r.reason: r for r in warnings_of(caplog)}
    assert len(warnings_of(caplog)) == 3  # one per reason, though each failed 5 times
    assert set(by_reason) == {"calibrator_error:KeyError", "shadow_error:OSError", "shadow_paused"}
    assert "'no table for v9'" in by_reason["calibrator_error:KeyError"].getMessage()
    assert "OSError: gone" in by_reason["shadow_error:OSError"].getMessage()
    assert "5 failures in a row" in by_reason["shadow_paused"].getMessage()
    assert shadow.stats_snapshot()["shadow"]["errors"] == 5


def test_recent_traffic_ratio_over_a_sliding_window() -> None:
    w = RecentTraffic(window_s=60)
    t = 5_000.0
    assert w.add(t, "treatment", True) and not w.add(t + 0.5, "treatment", False)  # one new second, once
    for k in range(8):
        w.add(t + 1 + k, "treatment", k == 7)
        if k == 1:
            w.add(t + 2, "control", True)
    assert w.ratios() == {"treatment": 0.2, "control": 1.0}
    assert w.ratios(t + 60.5) == {"treatment": 1 / 8, "control": 1.0}  # the first second has left the window
    assert w.ratios(t + 62) == {"treatment": 1 / 6}  # ... then the control arm's only answer
    assert w.add(t + 500, "treatment", True) and w.ratios() == {"treatment": 1.0}  # a long gap clears everything
    assert sum(w.served.values()) == 1 and sum(sum(r) for r in w._served.values()) == 1
    w.add(t + 499, "treatment", False)  # a clock stepping back counts in the newest second
    assert w.ratios() == {"treatment": 0.5}


def test_fallback_ratio_in_stats_and_the_window_gauges(bundle_a, scorer_a, calibrators, records) -> None:
    metrics = RecordingMetrics()
    service = make_service(bundle_a, scorer_a, calibrators, metrics=metrics)
    service.clock = clock = FakeClock()
    good, failing = service.down.score, Local(error=RuntimeError("x"))
    body = orjson.dumps(request_body(records[144]))

    async def go() -> None:
        for i in range(10):
            service.down.score = failing if i < 3 else good
            await service.rerank(body)
            clock.t += 0.25  # 10 requests over 2.5 s: three seconds opened

    asyncio.run(go())
    ratio = service.stats_snapshot()["fallback_ratio"]
    assert ratio == {"window_s": 60, "all": 0.3, "by_arm": {"treatment": 0.3}, "served": 10}
    # Published by the first request of each second (requests 1, 5 and 9), never per request.
    assert [w[0]["treatment"] for w in metrics.windows] == pytest.approx([1 / 1, 3 / 5, 3 / 9])
    assert len(metrics.models) == 7 and set(metrics.models) == {scorer_a.bundle.bundle_id}
    clock.t += 61
    assert service.stats_snapshot()["fallback_ratio"]["all"] is None  # nothing served in the last minute


def with_version(core: ScorerCore, version: str):
    def score(cl):
        r = core.score([cl])[0]
        r.model_version = version
        return r

    return score


def test_model_versions_by_id_with_first_and_last_seen(bundle_a, scorer_a, calibrators, records) -> None:
    """An alias moving from v1 to v2 while replicas converge: answers from both ids for a while."""
    metrics = RecordingMetrics()
    calls = {"n": 0}

    def converging(cl):  # v1 for the first 4 answers, then alternating, then v2 only
        calls["n"] += 1
        n = calls["n"]
        return with_version(scorer_a, "v1" if n <= 4 or (n <= 8 and n % 2) else "v2")(cl)

    service = make_service(bundle_a, scorer_a, calibrators, metrics=metrics, score=Local(converging))
    service.clock = clock = FakeClock(2_000.0)
    body = orjson.dumps(request_body(records[145]))

    async def go() -> None:
        for _ in range(12):
            await service.rerank(body)
            clock.t += 1.0

    asyncio.run(go())
    stats = service.stats_snapshot()
    assert stats["by_model"] == {"v1": 6, "v2": 6}
    versions = stats["model_versions"]
    assert versions["v1"] == {"first_seen": 2_000.0, "last_seen": 2_006.0, "responses": 6}
    assert versions["v2"] == {"first_seen": 2_005.0, "last_seen": 2_011.0, "responses": 6}
    assert versions["v1"]["last_seen"] - versions["v2"]["first_seen"] == 1.0  # the skew window
    assert stats["model_versions_recent"] == {"v1": 2_006.0, "v2": 2_011.0}
    assert [w[1] for w in metrics.windows] == [1] * 5 + [2] * 7  # cotrr_model_versions_served
    clock.t = 2_006.0 + 60.5
    assert service.stats_snapshot()["model_versions_recent"] == {"v2": 2_011.0}
    vs = ModelVersions(window_s=60)
    vs.add("v3", 0.0)
    assert vs.recent(60.0) == {"v3": 0.0} and vs.recent(60.1) == {}


# ----------------------------------------------------------------------------- Server-Timing stages


def timed(service: RerankService, body: dict) -> tuple[dict, dict[str, float]]:
    """The payload and the stages of its Server-Timing header (as a client parses them)."""
    timings = StageTimings()
    resp = asyncio.run(service.rerank(orjson.dumps(body), None, timings))
    header = timings.header()
    stages = parse_server_timing(header)
    assert len(stages) == header.count(";dur=") and all(v >= 0 for v in stages.values())
    assert stages["total"] >= stages["parse"] > 0
    assert stages["total"] >= sum(stages.get(k, 0.0) for k in ("parse", "score", "calibrate"))
    return resp, stages


def test_server_timing_stages_of_a_reranked_response(service, records) -> None:
    resp, stages = timed(service, request_body(records[141]))
    assert resp["calibrated"] and set(resp) == RESPONSE_KEYS  # the body is unchanged
    assert list(stages) == ["parse", "score", "model", "calibrate", "total"]
    assert 0 < stages["model"] <= stages["score"]  # the model ran inside the scorer round trip


def test_server_timing_stages_in_fused_mode_and_on_fallbacks(bundle_a, scorer_a, calibrators, records) -> None:
    calibrate = Local(calibrators.transform)
    fused = make_service(
        bundle_a,
        scorer_a,
        calibrators,
        score=Local(lambda cl: scorer_a.score([cl], calibrate=True)[0]),
        calibrate=calibrate,
    )
    resp, stages = timed(fused, request_body(records[142]))
    assert resp["calibrated"] and calibrate.calls == 0
    assert list(stages) == ["parse", "score", "model", "total"]  # no calibrator hop

    failing = make_service(bundle_a, scorer_a, calibrators, score=Local(error=RuntimeError("boom")))
    resp, stages = timed(failing, request_body(records[142]))
    assert resp["fallback"] == "scorer_error:RuntimeError" and list(stages) == ["parse", "total"]

    upstream = make_service(bundle_a, scorer_a, calibrators, routing=RoutingConfig(rollout_percentage=0))
    resp, stages = timed(upstream, request_body(records[142]))
    assert resp["arm"] == "control" and list(stages) == ["parse", "total"]

    bad_cal = make_service(bundle_a, scorer_a, calibrators, calibrate=Local(error=RuntimeError("x")))
    resp, stages = timed(bad_cal, request_body(records[142]))
    assert not resp["calibrated"] and list(stages) == ["parse", "score", "model", "total"]


def test_server_timing_on_a_rejected_request_and_the_header_format(service, records) -> None:
    timings = StageTimings(read=0.5)
    with pytest.raises(RequestError):
        asyncio.run(service.rerank(b"{not json", None, timings))
    assert timings.total is None and timings.parse is None  # a 4xx carries no Server-Timing
    assert StageTimings().header() == ""
    t = StageTimings(read=0.0123, parse=1.2344, score=3.1, model=1.05, total=6.2)
    assert t.header() == "read;dur=0.012, parse;dur=1.234, score;dur=3.100, model;dur=1.050, total;dur=6.200"
    assert parse_server_timing(t.header()) == {"read": 0.012, "parse": 1.234, "score": 3.1, "model": 1.05, "total": 6.2}
    assert parse_server_timing('cache;desc="Cache Read";dur=23.2, miss, db;dur=53') == {"cache": 23.2, "db": 53.0}


# ----------------------------------------------------------------------------- health, info, config


def test_health_runs_a_real_inference_without_touching_stats(bundle_a, scorer_a, calibrators) -> None:
    service = make_service(bundle_a, scorer_a, calibrators)
    ok, detail = asyncio.run(service.health())
    assert ok and detail["checks"]["scorer"]["model_version"] == scorer_a.bundle.bundle_id
    assert service.stats_snapshot()["requests"] == 0
    broken = make_service(bundle_a, scorer_a, calibrators, score=Local(error=RuntimeError("down")))
    ok, detail = asyncio.run(broken.health())
    assert not ok and detail["checks"]["scorer"]["ok"] is False and "down" in detail["checks"]["scorer"]["error"]
    no_cal = make_service(bundle_a, scorer_a, calibrators, calibrate=Local(error=RuntimeError("cal")))
    assert asyncio.run(no_cal.health())[0] is False


def test_model_info_and_configure(service, scorer_a) -> None:
    info = asyncio.run(service.model_info())
    assert info["model_version"] == scorer_a.bundle.bundle_id
    assert info["top_m"] == {"default": TOP_M, "max": TOP_M}
    assert info["feature_spec"]["candidate"]["visual"] == 8 and info["relevance_threshold"] == 1.0
    assert info["routing"]["rollout_percentage"] == 100
    service.configure(RoutingConfig(top_m=3))
    assert asyncio.run(service.model_info())["top_m"]["default"] == 3
    with pytest.raises(ValueError, match="top_m"):
        service.configure(RoutingConfig(top_m=TOP_M + 1))
    assert service.default_top_m == 3  # a rejected config changes nothing


# ----------------------------------------------------------------------------- scorer and calibrator cores


def test_scorer_hot_swap_checks_compatibility(bundle_a, bundle_b, tmp_path, test_data) -> None:
    core = ScorerCore.load(str(bundle_a))
    cl = synthetic_list(core.bundle.spec, n=6, window=4)
    before = core.score([cl])[0]
    core.swap(core.load_replacement(str(bundle_b)))
    after = core.score([cl])[0]
    assert after.model_version == read_meta(bundle_b).bundle_id != before.model_version
    small = make_bundle(tmp_path / "small", test_data, steps=1, top_m=4)
    with pytest.raises(ValueError, match="top_m"):
        core.load_replacement(str(small))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle_a, corrupt)
    (corrupt / "model.pt").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="checksum"):
        core.load_replacement(str(corrupt))
    core.swap_failed(str(corrupt), BundleError("checksum"))
    info = core.info()
    assert info["swaps"] == {"ok": 1, "error": 1} and "checksum" in info["last_swap_error"]
    assert core.score([cl])[0].model_version == after.model_version  # still serving the last good one


def test_scorer_fails_closed_on_a_missing_bundle(tmp_path) -> None:
    with pytest.raises(BundleError, match="no published bundle at"):
        ScorerCore.load(str(tmp_path / "nope"))


def test_calibrator_by_bundle_id(bundle_a, bundle_b, scorer_a) -> None:
    core = CalibratorCore()
    id_a = core.add(str(bundle_a))
    logits = np.array([-3.0, 0.0, 3.0])
    probs = core.transform(CalibrationInput(id_a, str(bundle_a), logits))
    np.testing.assert_allclose(probs, scorer_a.bundle.probabilities(logits))
    id_b = read_meta(bundle_b).bundle_id
    item = CalibrationInput(id_b, str(bundle_b), logits)
    assert core.missing([item]) == {id_b: str(bundle_b)}
    assert core.load_missing(core.missing([item])) == {}
    assert core.transform(item).shape == (3,)
    wrong = CalibrationInput("other-id", str(bundle_a), logits)
    assert "now holds bundle" in core.load_missing(core.missing([wrong]))["other-id"]
    with pytest.raises(KeyError):
        core.transform(wrong)


def test_scorer_regroups_the_lists_of_several_calls(scorer_a) -> None:
    lists = [synthetic_list(scorer_a.bundle.spec, n=6, window=4, seed=i) for i in range(5)]
    grouped = scorer_a.score_calls([lists[:2], lists[2:3], lists[3:]])
    assert [len(g) for g in grouped] == [2, 1, 2]
    flat = scorer_a.score(lists)
    for got, want in zip([r for g in grouped for r in g], flat):
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_calibrator_transform_each_fails_only_the_bad_items(bundle_a, calibrators) -> None:
    id_a = read_meta(bundle_a).bundle_id
    logits = np.array([-1.0, 1.0])
    items = [
        CalibrationInput(id_a, str(bundle_a), logits),
        CalibrationInput("unknown", "/nowhere", logits),
        CalibrationInput("failed-load", "/nowhere", logits),
    ]
    out = calibrators.transform_each(items, {"failed-load": "OSError: gone"})
    np.testing.assert_allclose(out[0], calibrators.transform(items[0]))
    assert isinstance(out[1], RuntimeError) and "KeyError" in str(out[1])
    assert isinstance(out[2], RuntimeError) and str(out[2]) == "OSError: gone"


def test_bundle_paths_and_meta(bundle_a, tmp_path, monkeypatch) -> None:
    with pytest.raises(BundleError, match="train_job.py"):
        read_meta(tmp_path / "missing")
    meta = read_meta(bundle_a)
    assert meta.top_m == TOP_M and meta.relevance_threshold == 1.0
    assert resolve_uri("rel/dir", "/base") == "/base/rel/dir"
    assert resolve_uri("file:///abs/dir", "/base") == "/abs/dir"
    assert resolve_uri("s3://bucket/reg/demo/id-1", "/base") == "s3://bucket/reg/demo/id-1"
    assert resolve_uri("reg/demo@production", "/base") == "/base/reg/demo@production"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        resolve_uri("http://host/b", "/base")


# --------------------------------------------------------------------------- replica health checks (Serve's check_health)


def test_scorer_health_check_runs_the_model_and_fails_on_broken_weights(bundle_a) -> None:
    import torch

    core = ScorerCore.load(str(bundle_a))  # its own copy: the weights are broken below
    assert core.health_check() > 0  # ms of a real forward pass
    with torch.no_grad():
        next(core.bundle.model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite logits"):
        core.health_check()


def test_calibrator_health_check(bundle_a, calibrators) -> None:
    calibrators.health_check()
    with pytest.raises(RuntimeError, match="no calibrator loaded"):
        CalibratorCore().health_check()

    class Broken:
        def predict(self, x):
            return np.full_like(x, 1.5)

    core = CalibratorCore()
    core.add(str(bundle_a))
    core._by_id["broken"] = Broken()
    with pytest.raises(RuntimeError, match="broken"):
        core.health_check()


# ----------------------------------------------------------------------------- interleaving mode


def interleave_service(bundle_a, scorer_a, calibrators, tmp_path, *, control=None, score=None, rollout=100):
    from cotrr_ray.experiments.eventlog import EventLog

    svc = make_service(
        bundle_a,
        scorer_a,
        calibrators,
        routing=RoutingConfig(rollout_percentage=rollout, mode="interleave", experiment_salt="il-test"),
        control=control,
        score=score,
    )
    svc.events = EventLog(str(tmp_path / "events"))
    return svc


def test_interleave_serves_the_team_draft_merge_of_both_arms_and_logs_teams(
    bundle_a, scorer_a, scorer_b, calibrators, records, tmp_path
) -> None:
    from cotrr_ray.experiments.interleaving import team_draft

    svc = interleave_service(bundle_a, scorer_a, calibrators, tmp_path, control=score_with(scorer_b))
    body = request_body(records[3], unit_id="il-user")
    resp = asyncio.run(svc.rerank(orjson.dumps(body), request_id="req-il-1"))
    assert resp["arm"] == "interleave" and resp["fallback"] is None and resp["calibrated"]
    assert resp["model_version"] == scorer_a.bundle.bundle_id  # the treatment's scores are answered
    # the expected merge, from each arm's own answer
    a = asyncio.run(make_service(bundle_a, scorer_a, calibrators).rerank(orjson.dumps(body)))
    b_svc = make_service(
        bundle_a, scorer_a, calibrators, routing=RoutingConfig(rollout_percentage=0), control=score_with(scorer_b)
    )
    b = asyncio.run(b_svc.rerank(orjson.dumps(body)))
    window = sum(r["reranked"] for r in a["results"])
    ta, tb = [r["index"] for r in a["results"][:window]], [r["index"] for r in b["results"][:window]]
    assert ta != tb, "the two bundles must rank this window differently for the test to mean anything"
    merged = team_draft(ta, tb, key="req-il-1", salt="il-test", k=window)
    got = [r["index"] for r in resp["results"]]
    assert got[:window] == list(merged.order) and got[window:] == list(range(window, len(got)))
    scores_a = {r["id"]: r["score"] for r in a["results"]}
    assert all(r["score"] == scores_a[r["id"]] for r in resp["results"])
    # the decision record: mode, team and competitive flag per merged position, none in the tail
    svc.events.close()
    lines = [json.loads(x) for f in sorted((tmp_path / "events").rglob("*.jsonl")) for x in f.read_text().splitlines()]
    (rec,) = [x for x in lines if x.get("kind") == "decision"]
    assert rec["arm"] == "interleave" and rec["mode"] == "interleave" and rec["request_id"] == "req-il-1"
    items = displayed_rows(rec["items"])
    assert rec["items"]["team"] == list(merged.teams)  # one entry per merged position, none for the tail
    assert [it["team"] for it in items[:window]] == list(merged.teams)
    assert [it["competitive"] for it in items[:window]] == list(merged.competitive)
    assert all(it["team"] is None and it["competitive"] is None for it in items[window:])


def test_interleave_without_a_control_bundle_merges_with_upstream_order(
    bundle_a, scorer_a, calibrators, records, tmp_path
) -> None:
    from cotrr_ray.experiments.interleaving import team_draft

    svc = interleave_service(bundle_a, scorer_a, calibrators, tmp_path)
    body = request_body(records[4], unit_id="il-user-2")
    resp = asyncio.run(svc.rerank(orjson.dumps(body), request_id="req-il-2"))
    a = asyncio.run(make_service(bundle_a, scorer_a, calibrators).rerank(orjson.dumps(body)))
    window = sum(r["reranked"] for r in a["results"])
    merged = team_draft(
        [r["index"] for r in a["results"][:window]], list(range(window)), key="req-il-2", salt="il-test"
    )
    assert resp["arm"] == "interleave" and [r["index"] for r in resp["results"][:window]] == list(merged.order)
    svc.events.close()


def test_interleave_falls_back_when_the_treatment_fails_and_spares_units_outside_the_rollout(
    bundle_a, scorer_a, scorer_b, calibrators, records, tmp_path
) -> None:
    failing = Local(error=RuntimeError("boom"))
    svc = interleave_service(bundle_a, scorer_a, calibrators, tmp_path, control=score_with(scorer_b), score=failing)
    body = request_body(records[5], unit_id="il-user-3")
    resp = asyncio.run(svc.rerank(orjson.dumps(body), request_id="req-il-3"))
    assert resp["arm"] == "interleave" and resp["fallback"].startswith("scorer_error")
    assert_upstream(resp, body)
    svc.events.close()
    outside = interleave_service(
        bundle_a, scorer_a, calibrators, tmp_path / "o", control=score_with(scorer_b), rollout=0
    )
    resp = asyncio.run(outside.rerank(orjson.dumps(body)))
    assert resp["arm"] == "control" and resp["model_version"] == scorer_b.bundle.bundle_id
    outside.events.close()
