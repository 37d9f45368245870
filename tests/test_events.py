"""Online-experiment events without Ray: feedback validation, dedupe, the durable event log (rotation,
partitions, group commit, SIGKILL durability, S3 staging and recovery), DuckDB analysis against an
independent pure-Python computation, the config, and the Router's feedback path (`RerankService`).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from _bundles import request_body
from pydantic import ValidationError

from cotrr_ray.config import AppArgs, EventLogConfig, RoutingConfig
from cotrr_ray.experiments import analysis
from cotrr_ray.experiments.eventlog import EventLog
from cotrr_ray.experiments.events import (
    Decision,
    Displayed,
    FeedbackError,
    FeedbackLimits,
    FeedbackParser,
    RecentIds,
    displayed_rows,
    feedback_record,
    split_new,
)
from cotrr_ray.serving.errors import from_validation_error
from cotrr_ray.storage import locate

HERE = Path(__file__).resolve().parent
NOW = 1_780_000_000.0


def ev(i: int = 0, **over) -> dict:
    e = {"event_id": f"e{i}", "request_id": "r1", "item_id": "c1", "type": "click", "timestamp": NOW - 5}
    e.update(over)
    return e


def parse(events, limits: FeedbackLimits | None = None):
    parser = FeedbackParser(limits or FeedbackLimits(), clock=lambda: NOW)
    body = (
        events
        if isinstance(events, bytes)
        else orjson.dumps({"events": events} if isinstance(events, list) else events)
    )
    return parser.parse(body)


def error_of(events, limits: FeedbackLimits | None = None) -> tuple[str, str | None, str]:
    """(code, field, message) as the HTTP layer would answer."""
    try:
        parse(events, limits)
    except ValidationError as e:
        err = from_validation_error(e)
        return err.code, err.field, err.message
    except FeedbackError as e:
        return e.code, e.field, e.message
    raise AssertionError("accepted")


# ============================================================================ validation


def test_a_valid_batch_parses() -> None:
    out = parse([ev(0), ev(1, type="impression", value=None), ev(2, type="conversion", value=12.5)])
    assert [e["event_id"] for e in out] == ["e0", "e1", "e2"] and out[2]["value"] == 12.5


@pytest.mark.parametrize(
    "events, field, fragment",
    [
        (
            [ev(0), ev(1), ev(2), {k: v for k, v in ev(3).items() if k != "timestamp"}],
            "events[3].timestamp",
            "required",
        ),
        ([ev(0), ev(1, event_id="")], "events[1].event_id", "at least 1"),
        ([ev(0, request_id=7)], "events[0].request_id", "string"),
        ([ev(0, item_id="x" * 257)], "events[0].item_id", "longer than 256"),
        ([ev(0), ev(1, type="purchase")], "events[1].type", "unknown event type"),
        ([ev(0, timestamp=NOW - 8 * 86400)], "events[0].timestamp", "outside"),
        ([ev(0, timestamp=NOW + 3600)], "events[0].timestamp", "outside"),
        ([ev(0, timestamp="yesterday")], "events[0].timestamp", "number"),
        ([ev(0, value="a lot")], "events[0].value", "number"),
        ([ev(0, timestamp=str(NOW))], "events[0].timestamp", "number"),  # a numeric string is not coerced
        ([ev(0, value="39.9")], "events[0].value", "number"),
        ([ev(0, timestamp=True)], "events[0].timestamp", "number"),
        ([ev(0, extra=1)], "events[0].extra", "Extra inputs"),
        ([], "events", "at least 1"),
        ({"events": {"a": 1}}, "events", "array"),
        ({"evts": []}, None, ""),
    ],
)
def test_each_bad_field_is_named(events, field, fragment) -> None:
    code, got_field, message = error_of(events)
    assert code == "invalid_request"
    if field is None:  # a missing top-level key and an unknown one: either path is the truth
        assert got_field in ("events", "evts")
    else:
        assert got_field == field and fragment in message, message


def test_nan_timestamp_is_refused_with_its_field() -> None:
    code, field, _ = error_of(
        b'{"events": [{"event_id": "a", "request_id": "r", "item_id": "i", "type": "click", "timestamp": NaN}]}'
    )
    assert (code, field) in {("invalid_request", "events[0].timestamp"), ("invalid_json", None)}


def test_invalid_json_and_too_many_events() -> None:
    assert error_of(b"{not json")[0] == "invalid_json"
    code, field, message = error_of([ev(i) for i in range(11)], FeedbackLimits(max_events=10))
    assert (code, field) == ("too_many_events", "events") and "11 events" in message


def test_configured_types_extend_the_set() -> None:
    limits = FeedbackLimits(event_types=("click", "add_to_cart"))
    assert parse([ev(0, type="add_to_cart")], limits)[0]["type"] == "add_to_cart"
    assert error_of([ev(0, type="impression")], limits)[1] == "events[0].type"


def test_split_new_drops_acked_and_repeated_ids_and_the_memory_is_bounded() -> None:
    recent = RecentIds(3)
    fresh, dup = split_new([ev(0), ev(1), ev(0)], recent)
    assert [e["event_id"] for e in fresh] == ["e0", "e1"] and dup == 1
    recent.add_all(["e0", "e1"])
    fresh, dup = split_new([ev(0), ev(2)], recent)
    assert [e["event_id"] for e in fresh] == ["e2"] and dup == 1
    recent.add_all(["e2", "e3", "e4"])
    assert len(recent) == 3 and "e0" not in recent and "e4" in recent


# ============================================================================ the event log


def fb(eid: str, request_id: str = "r", item_id: str = "x", type_: str = "click", ts: float | None = None) -> dict:
    t = time.time() if ts is None else ts
    event = {
        "event_id": eid,
        "request_id": request_id,
        "item_id": item_id,
        "type": type_,
        "timestamp": t,
        "value": None,
    }
    return feedback_record(event, received_at=t, replica="test")


def segments(root: Path, kind: str) -> list[Path]:
    return sorted((root / f"kind={kind}").glob("date=*/*.jsonl"))


def test_partitions_size_rotation_and_unique_names(tmp_path) -> None:
    rotated = []
    log = EventLog(str(tmp_path), max_segment_bytes=4096, on_rotate=lambda k, r: rotated.append((k, r)))
    for i in range(200):
        log.append("feedback", [fb(f"e{i}")]).result()
    log.append("decision", [{"kind": "decision", "request_id": "r"}]).result()
    log.close()
    files = segments(tmp_path, "feedback")
    assert len(files) > 5 and all(f.stat().st_size <= 4096 for f in files)
    assert len(segments(tmp_path, "decision")) == 1
    assert all(f.parent.name.startswith("date=20") for f in files)
    assert all(f"-{os.getpid()}-" in f.name and log.writer_id in f.name for f in files)
    assert len({f.name for f in files}) == len(files)
    assert ("feedback", "size") in rotated and ("decision", "close") in rotated
    assert analysis.event_ids(analysis.connect(str(tmp_path))) == {f"e{i}" for i in range(200)}


def test_age_rotation_closes_idle_segments(tmp_path) -> None:
    rotated = []
    log = EventLog(str(tmp_path), max_segment_age_s=0.3, on_rotate=lambda k, r: rotated.append((k, r)))
    log.append("feedback", [fb("a")]).result()
    deadline = time.monotonic() + 5
    while not rotated and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rotated == [("feedback", "age")]  # closed by the writer's tick, without another append
    log.append("feedback", [fb("b")]).result()
    log.close()
    assert len(segments(tmp_path, "feedback")) == 2


def test_date_change_starts_a_new_partition(tmp_path) -> None:
    clock = [1_780_012_799.0]  # 2026-05-28 23:59:59 UTC
    log = EventLog(str(tmp_path), clock=lambda: clock[0])
    log.append("feedback", [fb("a")]).result()
    clock[0] += 2
    log.append("feedback", [fb("b")]).result()
    log.close()
    assert [f.parent.name for f in segments(tmp_path, "feedback")] == ["date=2026-05-28", "date=2026-05-29"]


def test_concurrent_appends_share_fsyncs(tmp_path) -> None:
    log = EventLog(str(tmp_path))

    def worker(t: int) -> None:
        for i in range(100):
            log.append("feedback", [fb(f"t{t}-{i}")]).result()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert log.stats.records["feedback"] == 800
    assert log.stats.commits < 800  # group commit: some appends shared a write + fsync
    assert len(analysis.event_ids(str(tmp_path))) == 800


def test_append_nowait_is_committed_by_close_and_close_is_idempotent(tmp_path) -> None:
    log = EventLog(str(tmp_path))
    log.append_nowait("decision", [{"kind": "decision", "request_id": f"r{i}", "ts": 1.0} for i in range(50)])
    log.close()
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append("feedback", [fb("late")])
    assert analysis.feedback_summary(str(tmp_path))["decisions"] == 50


def test_buffered_decisions_are_committed_on_schedule_in_few_fsyncs(tmp_path) -> None:
    commits: list[tuple[str, int, float]] = []
    log = EventLog(str(tmp_path), commit_interval_s=0.05, on_commit=lambda k, n, ms: commits.append((k, n, ms)))
    for i in range(200):  # a burst of responses: no flush, no close, no waited append
        log.append_nowait("decision", [{"kind": "decision", "request_id": f"r{i}", "ts": 1.0}])
    deadline = time.monotonic() + 5
    while sum(n for _, n, _ in commits) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    on_disk = sum(len(f.read_bytes().splitlines()) for f in segments(tmp_path, "decision"))
    log.close()
    assert on_disk == 200  # written and fsync'ed by the scheduled commit alone
    assert len(commits) < 20  # the burst shared commits instead of one fsync per record


def test_a_waited_append_carries_the_buffered_records_along(tmp_path) -> None:
    log = EventLog(str(tmp_path), commit_interval_s=10.0)  # the schedule alone would wait ~1 s
    log.append_nowait("decision", [{"kind": "decision", "request_id": "r0", "ts": 1.0}])
    log.flush()
    assert sum(len(f.read_bytes().splitlines()) for f in segments(tmp_path, "decision")) == 1
    log.close()
    with pytest.raises(ValueError, match="commit_interval_s"):
        EventLog(str(tmp_path), commit_interval_s=0)


def test_a_write_error_fails_the_futures_not_the_writer(tmp_path, monkeypatch) -> None:
    log = EventLog(str(tmp_path))
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        log.append("feedback", [fb("a")]).result(5)
    monkeypatch.setattr(os, "fsync", real)
    log.append("feedback", [fb("b")]).result(5)  # the writer thread lives on
    log.close()
    assert log.stats.write_errors == 1


def run_writer_and_kill(uri: str, staging: Path, acks_wanted: int = 40) -> set[str]:
    """Start the child writer, read acknowledged ids until `acks_wanted` batches, SIGKILL it mid-stream."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_eventlog_writer.py"), uri, str(staging), "5"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    acked: set[str] = set()
    try:
        for _ in range(acks_wanted):
            line = proc.stdout.readline()
            assert line, "the writer died before acknowledging"
            acked.update(line.split())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: more appends are in flight
        proc.wait(10)
    return acked


def test_acked_events_survive_sigkill_and_a_torn_line_is_tolerated(tmp_path) -> None:
    root = tmp_path / "log"
    acked = run_writer_and_kill(str(root), tmp_path / "staging")
    files = segments(root, "feedback")
    assert files
    with open(files[-1], "ab") as f:  # what a kill inside write() leaves: half a line
        f.write(b'{"kind": "feedback", "event_id": "torn", "requ')
    con = analysis.connect(str(root))
    logged = analysis.event_ids(con)
    assert acked <= logged and "torn" not in logged
    assert analysis.feedback_summary(con)["unreadable_lines"] == 1


def test_s3_segments_are_staged_then_uploaded_on_close(s3_bucket, tmp_path) -> None:
    uri = f"{s3_bucket}/events-{uuid.uuid4().hex[:8]}"
    staging = tmp_path / "staging"
    log = EventLog(uri, staging_dir=str(staging), max_segment_age_s=3600)
    log.append("feedback", [fb("a"), fb("b")]).result()
    assert analysis.segment_files(locate(uri), "feedback") == []  # open: on local disk only
    assert len(list(staging.rglob("*.jsonl"))) == 1
    log.close()
    assert list(staging.rglob("*.jsonl")) == [] and log.stats.uploads == 1
    assert analysis.event_ids(uri) == {"a", "b"}


def test_s3_leftovers_of_a_killed_writer_are_uploaded_at_the_next_start(s3_bucket, tmp_path) -> None:
    uri = f"{s3_bucket}/events-{uuid.uuid4().hex[:8]}"
    staging = tmp_path / "staging"
    live = EventLog(uri, staging_dir=str(staging))  # another live replica on the node: never touched
    live.append("feedback", [fb("live")]).result()
    acked = run_writer_and_kill(uri, staging, acks_wanted=10)
    assert analysis.event_ids(uri) == set()  # the killed writer uploaded nothing
    nxt = EventLog(uri, staging_dir=str(staging))
    assert nxt.stats.recovered_uploads == 1
    assert acked <= analysis.event_ids(uri)
    assert "live" not in analysis.event_ids(uri)  # its lock was held: left for it
    live.close()
    nxt.close()
    assert "live" in analysis.event_ids(uri)


def test_an_object_store_log_needs_a_staging_dir() -> None:
    with pytest.raises(ValueError, match="staging_dir"):
        EventLog("s3://bucket/events")


# ============================================================================ analysis


def synthetic_log(root: Path, seed: int = 0) -> dict:
    """A small random log (decisions, clicks with retries, impressions, orphans) and its raw lists."""
    rng = random.Random(seed)
    log = EventLog(str(root), max_segment_bytes=8192)
    decisions, events = [], []
    for r in range(120):
        unit = f"u{rng.randrange(25)}"
        arm = "treatment" if int(unit[1:]) % 2 else "control"
        n = rng.randrange(0, 8)
        items = Displayed(
            item_id=[f"i{j}" for j in range(n)],
            upstream_index=[rng.randrange(20) for _ in range(n)],
            score=[0.1 * j for j in range(n)],
            probability=[0.5] * n,
            propensity=[1.0] * n,
        )
        d = Decision(
            f"r{r}",
            unit,
            f"q{r}",
            1,
            arm,
            "salt-1" if r < 100 else "salt-0",
            50.0,
            False,
            "m",
            "m",
            NOW + r,
            rng.uniform(1, 50),
            "scorer_timeout" if rng.random() < 0.1 else None,
            n,
            n,
            items,
        )
        decisions.append(d.record())
        for item_id in items.item_id:
            if rng.random() < 0.5:
                events.append(fb(f"imp-{r}-{item_id}", f"r{r}", item_id, "impression", NOW))
            if rng.random() < 0.25:
                e = fb(f"clk-{r}-{item_id}", f"r{r}", item_id, "click", NOW)
                events += [e] * rng.choice([1, 1, 2])  # a retried event: same id twice
                if rng.random() < 0.2:  # a second click on the same item (another id)
                    events.append(fb(f"clk2-{r}-{item_id}", f"r{r}", item_id, "click", NOW))
    events += [fb(f"orphan-{i}", f"nope-{i}", "i0", "click", NOW) for i in range(7)]
    events.append(fb("unshown", "r3", "not-displayed", "click", NOW))
    rng.shuffle(events)
    for d in decisions:
        log.append_nowait("decision", [d])
    for i in range(0, len(events), 9):
        log.append("feedback", events[i : i + 9]).result()
    log.close()
    return {"decisions": decisions, "events": events}


def expected_per_query(raw: dict, salt: str | None, k: int) -> list[dict]:
    """The same definitions as analysis.py, computed with plain Python (dedupe, join, ranks)."""
    by_id = {}
    for e in raw["events"]:
        by_id.setdefault(e["event_id"], e)
    clicks, imps = set(), set()
    for e in by_id.values():
        (clicks if e["type"] == "click" else imps).add((e["request_id"], e["item_id"]))
    out = []
    for d in raw["decisions"]:
        if salt is not None and d["experiment_salt"] != salt:
            continue
        shown = displayed_rows(d["items"])
        pos = [it["position"] for it in shown if (d["request_id"], it["item_id"]) in clicks]
        out.append(
            {
                "unit_id": d["unit_id"],
                "arm": d["arm"],
                "clicks": len(pos),
                "impressions": sum((d["request_id"], it["item_id"]) in imps for it in shown),
                "rr": 1 / (min(pos) + 1) if pos else 0.0,
                "clicks_at_k": sum(p < k for p in pos),
                "shown_at_k": sum(it["position"] < k for it in shown),
                "latency_ms": d["latency_ms"],
                "fallback": d["fallback"],
            }
        )
    return out


def test_unit_table_and_arm_metrics_match_a_pure_python_computation(tmp_path) -> None:
    raw = synthetic_log(tmp_path)
    con = analysis.connect(str(tmp_path))
    k = 3
    rows = expected_per_query(raw, "salt-1", k)
    want = defaultdict(lambda: defaultdict(float))
    for q in rows:
        w = want[(q["unit_id"], q["arm"])]
        w["queries"] += 1
        w["clicks"] += q["clicks"]
        w["clicked_queries"] += q["clicks"] > 0
        w["impressions"] += q["impressions"]
        w["rr_sum"] += q["rr"]
        w["clicks_at_k"] += q["clicks_at_k"]
        w["shown_at_k"] += q["shown_at_k"]
    got = analysis.unit_table(con, "salt-1", k=k).to_pylist()
    assert len(got) == len(want)
    assert list(got[0])[:7] == ["unit_id", "arm", "queries", "clicks", "clicked_queries", "impressions", "rr_sum"]
    for g in got:
        w = want[(g["unit_id"], g["arm"])]
        for col in ("queries", "clicks", "clicked_queries", "impressions", "clicks_at_k", "shown_at_k"):
            assert g[col] == w[col], (g, col)
        assert g["rr_sum"] == pytest.approx(w["rr_sum"])
    assert sum(g["clicks"] for g in got) > 10  # the fixture has real signal

    for m in analysis.arm_metrics(con, "salt-1", k=k).to_pylist():
        qs = [q for q in rows if q["arm"] == m["arm"]]
        lat = np.array([q["latency_ms"] for q in qs])
        assert m["queries"] == len(qs) and m["units"] == len({q["unit_id"] for q in qs})
        assert m["clicks_per_query"] == pytest.approx(sum(q["clicks"] for q in qs) / len(qs))
        assert m["ctr_at_k"] == pytest.approx(sum(q["clicks_at_k"] for q in qs) / sum(q["shown_at_k"] for q in qs))
        assert m["abandonment"] == pytest.approx(sum(q["clicks"] == 0 for q in qs) / len(qs))
        assert m["mrr"] == pytest.approx(sum(q["rr"] for q in qs) / len(qs))
        assert m["fallback_rate"] == pytest.approx(sum(q["fallback"] for q in qs) / len(qs))
        for p in (50, 95, 99):
            assert m[f"latency_p{p}_ms"] == pytest.approx(np.percentile(lat, p))


def test_feedback_summary_counts_duplicates_orphans_and_unshown_items(tmp_path) -> None:
    raw = synthetic_log(tmp_path, seed=1)
    s = analysis.feedback_summary(str(tmp_path))
    distinct = {e["event_id"] for e in raw["events"]}
    assert s["raw_events"] == len(raw["events"]) and s["events"] == len(distinct)
    assert s["duplicates"] == len(raw["events"]) - len(distinct) > 0
    assert s["orphans"] == 7 and s["unmatched_items"] == 1 and s["decisions"] == 120
    assert analysis.unit_table(str(tmp_path), "no-such-salt").num_rows == 0


def test_an_empty_log_analyses_to_empty_tables(tmp_path) -> None:
    assert analysis.unit_table(str(tmp_path)).num_rows == 0
    assert analysis.feedback_summary(str(tmp_path))["events"] == 0


# ============================================================================ config


def test_event_log_config_defaults_and_limits() -> None:
    cfg = EventLogConfig()
    assert cfg.uri is None and cfg.event_types == ["impression", "click", "conversion"]
    for bad in ({"max_segment_bytes": 10}, {"event_types": []}, {"max_events_per_batch": 0}, {"uri_typo": "x"}):
        with pytest.raises(ValidationError):
            EventLogConfig.model_validate(bad)
    assert AppArgs(event_log={"uri": "/tmp/x"}).event_log.uri == "/tmp/x"


def test_build_app_resolves_the_event_log_paths(bundle_a, tmp_path, monkeypatch) -> None:
    from cotrr_ray.serving.app import build_app

    monkeypatch.chdir(tmp_path)
    app = build_app(AppArgs(bundle_uri=str(bundle_a), event_log={"uri": "events", "staging_dir": "stage"}))
    args = app._bound_deployment.init_args[3]
    assert args.event_log.uri == str(tmp_path / "events") and args.event_log.staging_dir == str(tmp_path / "stage")
    app = build_app(AppArgs(bundle_uri=str(bundle_a), event_log={"uri": "s3://b/events"}))
    assert app._bound_deployment.init_args[3].event_log.uri == "s3://b/events"


# ============================================================================ the Router's feedback path


class FakeHttpRequest:
    def __init__(self, body: bytes, headers: dict[str, str] | None = None):
        self.headers = {"content-length": str(len(body)), **(headers or {})}
        self._body = body

    async def stream(self):
        yield self._body


class RecordingMetrics:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a: self.calls.append((name, *a))


@pytest.fixture()
def feedback_service(bundle_a, tmp_path):
    from test_serving import Local, make_service  # noqa: F401  (fixtures come from that module's helpers)

    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.serving.coalescer import Downstream
    from cotrr_ray.serving.observability import ExposureLog
    from cotrr_ray.serving.scorer import CalibratorCore, ScorerCore
    from cotrr_ray.serving.service import RerankService

    scorer = ScorerCore.load(str(bundle_a))
    cal = CalibratorCore()
    cal.add(str(bundle_a))
    down = Downstream(
        score=Local(lambda cl: scorer.score([cl])[0]), calibrate=Local(cal.transform), info=Local(lambda _: {})
    )
    log = EventLog(str(tmp_path / "events"))
    args = AppArgs(
        bundle_uri=str(bundle_a),
        routing=RoutingConfig(rollout_percentage=50, experiment_salt="fb"),
        event_log={"uri": str(tmp_path / "events"), "max_events_per_batch": 5, "max_body_bytes": 2048},
    )
    metrics = RecordingMetrics()
    svc = RerankService(read_meta(bundle_a), args, down, metrics=metrics, exposure=ExposureLog(None), events=log)
    yield svc, log, tmp_path / "events", metrics
    log.close()


def post_feedback(svc, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return asyncio.run(svc.handle_feedback(FakeHttpRequest(raw)))


def test_feedback_round_trip_through_the_service(feedback_service, records) -> None:
    svc, log, root, metrics = feedback_service
    responses = [
        asyncio.run(svc.rerank(orjson.dumps(request_body(r, unit_id=f"user-{i}")))) for i, r in enumerate(records[:6])
    ]
    now = time.time()
    events = [
        {
            "event_id": f"c{i}",
            "request_id": r["request_id"],
            "item_id": r["results"][1]["id"],
            "type": "click",
            "timestamp": now,
        }
        for i, r in enumerate(responses[:4])
    ]
    assert post_feedback(svc, {"events": events}) == (200, {"accepted": 4, "duplicates": 0})
    assert post_feedback(svc, {"events": events[:2]}) == (200, {"accepted": 0, "duplicates": 2})  # a retry
    orphan = {**events[0], "event_id": "o1", "request_id": "unknown"}
    assert post_feedback(svc, {"events": [orphan]})[0] == 200
    log.flush()
    con = analysis.connect(str(root))
    s = analysis.feedback_summary(con)
    assert (s["decisions"], s["events"], s["orphans"], s["duplicates"]) == (6, 5, 1, 0)
    units = analysis.unit_table(con, "fb").to_pylist()
    assert sum(u["queries"] for u in units) == 6 and sum(u["clicks"] for u in units) == 4
    assert {u["rr_sum"] for u in units if u["clicks"]} == {0.5}  # each click at position 1
    rec = con.execute("SELECT * FROM decisions WHERE request_id = ?", [responses[0]["request_id"]]).fetchone()
    cols = [c[0] for c in con.description]
    d = dict(zip(cols, rec))
    assert d["arm"] == responses[0]["arm"] and d["mode"] == "ab" and d["model_id"] == responses[0]["model_version"]
    assert d["items"]["item_id"] == [x["id"] for x in responses[0]["results"]]
    assert all(it["propensity"] == 1.0 and it["team"] is None for it in displayed_rows(d["items"]))
    assert ("feedback", "accepted", "click", 4) in metrics.calls and (
        "feedback",
        "duplicate",
        "click",
        2,
    ) in metrics.calls
    assert svc.stats_snapshot()["feedback"]["accepted"] == 5


def test_feedback_errors_use_the_error_vocabulary(feedback_service) -> None:
    svc, *_ = feedback_service
    status, body = post_feedback(svc, {"events": [ev(0, timestamp=time.time()), ev(1, type="swipe")]})
    assert status == 422 and body["error"]["code"] == "invalid_request" and body["error"]["field"] == "events[1].type"
    status, body = post_feedback(svc, {"events": [ev(i, timestamp=time.time()) for i in range(6)]})
    assert status == 413 and body["error"]["code"] == "too_many_events"
    status, body = post_feedback(svc, b" " * 4096)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert post_feedback(svc, b"nope")[1]["error"]["code"] == "invalid_json"
    assert post_feedback(svc, {"events": [ev(0, timestamp=time.time())]})[0] == 200  # unaffected by the others
    assert svc.stats_snapshot()["feedback"]["rejected:invalid_request"] == 1


def test_feedback_is_404_without_an_event_log(bundle_a) -> None:
    from test_serving import make_service

    from cotrr_ray.serving.scorer import CalibratorCore, ScorerCore

    svc = make_service(bundle_a, ScorerCore.load(str(bundle_a)), CalibratorCore())
    status, body = post_feedback(svc, {"events": [ev(0, timestamp=time.time())]})
    assert status == 404 and "event_log.uri" in body["error"]["message"]


def test_a_failed_write_is_503_and_not_remembered_as_acked(feedback_service) -> None:
    svc, log, *_ = feedback_service
    real = log.append_async

    async def broken(kind, records):
        raise OSError(28, "No space left on device")

    log.append_async = broken
    batch = {"events": [ev(0, timestamp=time.time())]}
    status, body = post_feedback(svc, batch)
    assert status == 503 and body["error"]["code"] == "log_unavailable"
    log.append_async = real
    assert post_feedback(svc, batch) == (200, {"accepted": 1, "duplicates": 0})  # the retry is written


def test_events_bench_smoke_without_http(tmp_path) -> None:
    out = tmp_path / "events.json"
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "bench" / "events_bench.py"),
            "--seconds",
            "0.3",
            "--skip-http",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rows = orjson.loads(out.read_bytes())["rows"]
    assert {r["phase"] for r in rows} == {"log", "decisions"}
    for r in rows:
        if r["phase"] == "decisions":
            assert r["records"] > 0 and r["commits_per_s"] > 0
            # buffered records wait for the schedule: their commit latency is positive and bounded
            assert 0 < r["commit_ms_max"] < 5_000
