"""The event model of online experiments: decision records (what was shown) and feedback events.

Decision record (``kind: "decision"``), one per answered rerank request, written by the Router::

    {kind, schema_version, request_id, unit_id, query_id, bucket, arm, mode, experiment_salt,
     rollout_percentage, shadow, model_id, calibrator_version, ts, latency_ms, fallback,
     fallback_reason, n_candidates, window,
     items: {item_id: [...], upstream_index: [...], score: [...], probability: [...],
             propensity: [...], team: [...] | null, competitive: [...] | null}}

`items` is the displayed list (the response's results, top_n applied) in final order, stored
column by column: the item at final position p is entry p of every column (`Displayed.rows()` and
`displayed_rows` give the per-item view; analysis unnests the columns side by side). Columns and not
one object per item because a record holds ~100 items and is built and serialised on the Router's
request path for every answer: 4x fewer bytes and ~4x less CPU (bench/README, experiments_cost).
`propensity` is the probability that the policy put that item at that position: 1.0 while ordering
is deterministic. With `mode` "interleave", `team` and `competitive` hold one entry per position of
the merged window (shorter than the list: the tail below the window belongs to no team); in "ab"
mode both are null. The calibrator
ships inside the bundle, so `calibrator_version` is the bundle id that produced the probabilities
(null when the response carries none).

Feedback (``POST /v1/feedback``)::

    {"events": [{"event_id", "request_id", "item_id", "type", "timestamp", "value"?}, ...]}

`type` is one of `FeedbackLimits.event_types` (default impression, click, conversion);
`timestamp` is Unix seconds (float) on the client's clock and must lie within
[now - max_event_age_s, now + max_clock_skew_s]; `value` is an optional finite number (e.g. an
order value). `event_id` makes a retry idempotent: analysis keeps one event per id, and each
Router replica also drops ids it acknowledged recently (`RecentIds`). A `request_id` the log has
never seen is accepted (Routers are stateless) and counted as an orphan in analysis.

Ray-free; serving maps `FeedbackError` and pydantic's `ValidationError` to its 4xx vocabulary.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from cotrr_ray.experiments.interleaving import Interleaved

SCHEMA_VERSION = 2  # 2: `items` stored column by column
DEFAULT_EVENT_TYPES = ("impression", "click", "conversion")


class FeedbackError(ValueError):
    """A feedback body refused for a reason pydantic does not see; `code` is a serving error code."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True)
class FeedbackLimits:
    """What one feedback batch may hold (from `cotrr_ray.config.EventLogConfig`)."""

    max_events: int = 1000
    max_string_length: int = 256
    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES
    max_event_age_s: float = 7 * 86400.0
    max_clock_skew_s: float = 300.0


class FeedbackEventIn(BaseModel):
    """One interaction with a displayed item of a reranked list."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    event_id: str = Field(min_length=1, description="Client-chosen unique id; a retry with the same id is a no-op.")
    request_id: str = Field(min_length=1, description="The request_id of the rerank response the item was shown in.")
    item_id: str = Field(min_length=1, description="The candidate id, as in the rerank request.")
    type: str = Field(min_length=1, description="Event type, one of the configured set (impression, click, ...).")
    # strict: a JSON number only; "1780000000" or true would otherwise be coerced and logged as if sent
    timestamp: float = Field(strict=True, description="When it happened: Unix seconds (client clock), a JSON number.")
    value: float | None = Field(None, strict=True, description="Optional number, e.g. a conversion's value.")


class FeedbackBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEventIn] = Field(min_length=1)


_STRING_FIELDS = ("event_id", "request_id", "item_id", "type")


class FeedbackParser:
    """Body bytes -> validated events (dicts), raising `ValidationError` or `FeedbackError`."""

    def __init__(self, limits: FeedbackLimits, clock=time.time):
        self.limits = limits
        self.clock = clock
        self._types = frozenset(limits.event_types)
        self._model = create_model(
            "FeedbackBatchLimited",
            __base__=FeedbackBatchIn,
            events=(list[FeedbackEventIn], Field(min_length=1, max_length=limits.max_events)),
        )

    def parse(self, body: bytes) -> list[dict[str, Any]]:
        try:
            batch = self._model.model_validate_json(body)
        except ValidationError as e:
            for err in e.errors():  # the list bound is checked before any event is validated
                if err["type"] == "too_long" and tuple(err["loc"]) == ("events",):
                    n = err.get("ctx", {}).get("actual_length")
                    raise FeedbackError(
                        "too_many_events", f"{n} events, more than the maximum of {self.limits.max_events}", "events"
                    ) from None
            raise
        now = self.clock()
        out = []
        for i, ev in enumerate(batch.events):
            self._check(i, ev, now)
            out.append(ev.model_dump())
        return out

    def _check(self, i: int, ev: FeedbackEventIn, now: float) -> None:
        lim = self.limits
        for name in _STRING_FIELDS:
            if len(getattr(ev, name)) > lim.max_string_length:
                raise FeedbackError(
                    "invalid_request", f"longer than {lim.max_string_length} characters", f"events[{i}].{name}"
                )
        if ev.type not in self._types:
            raise FeedbackError(
                "invalid_request",
                f"unknown event type {ev.type!r}; expected one of {sorted(self._types)}",
                f"events[{i}].type",
            )
        if (
            not math.isfinite(ev.timestamp)
            or not now - lim.max_event_age_s <= ev.timestamp <= now + lim.max_clock_skew_s
        ):
            raise FeedbackError(
                "invalid_request",
                f"timestamp {ev.timestamp!r} (Unix seconds) is outside [now - {lim.max_event_age_s:g} s, "
                f"now + {lim.max_clock_skew_s:g} s]",
                f"events[{i}].timestamp",
            )


class RecentIds:
    """The event ids a replica acknowledged lately, bounded (FIFO eviction), so a client retrying a
    batch does not write it again. Analysis dedupes by event_id anyway: this only keeps the log small."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add_all(self, ids: list[str]) -> None:
        if self.capacity <= 0:
            return
        for event_id in ids:
            self._ids[event_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def split_new(events: list[dict[str, Any]], recent: RecentIds) -> tuple[list[dict[str, Any]], int]:
    """(events to write, duplicates): drops ids acknowledged before and repeats inside the batch."""
    seen: set[str] = set()
    fresh = []
    for ev in events:
        eid = ev["event_id"]
        if eid in recent or eid in seen:
            continue
        seen.add(eid)
        fresh.append(ev)
    return fresh, len(events) - len(fresh)


def feedback_record(event: dict[str, Any], *, received_at: float, replica: str) -> dict[str, Any]:
    """The logged form of a validated event: the client's fields plus when/where it was received."""
    return {
        "kind": "feedback",
        "schema_version": SCHEMA_VERSION,
        **event,
        "received_at": received_at,
        "replica": replica,
    }


@dataclass
class Displayed:
    """The displayed list of one decision, column by column: position p is entry p of each column."""

    item_id: list[str]
    upstream_index: list[int]
    score: list[float | None]
    probability: list[float | None]
    propensity: list[float]
    team: list[str] | None = None  # interleaved: one per merged-window position, else None
    competitive: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.item_id)

    def record(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "upstream_index": self.upstream_index,
            "score": self.score,
            "probability": self.probability,
            "propensity": self.propensity,
            "team": self.team,
            "competitive": self.competitive,
        }

    def rows(self) -> list[dict[str, Any]]:
        return displayed_rows(self.record())


def displayed_rows(items: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged `items` record as one dict per displayed item, with `position`; `team` and
    `competitive` are None past the merged window (or everywhere when not interleaved)."""
    team, competitive = items.get("team") or [], items.get("competitive") or []
    return [
        {
            "item_id": item_id,
            "position": p,
            "upstream_index": items["upstream_index"][p],
            "score": items["score"][p],
            "probability": items["probability"][p],
            "propensity": items["propensity"][p],
            "team": team[p] if p < len(team) else None,
            "competitive": competitive[p] if p < len(competitive) else None,
        }
        for p, item_id in enumerate(items["item_id"])
    ]


@dataclass
class Decision:
    """One answered rerank request, as logged (see the module docstring)."""

    request_id: str
    unit_id: str
    query_id: str
    bucket: int
    arm: str
    experiment_salt: str
    rollout_percentage: float
    shadow: bool
    model_id: str | None
    calibrator_version: str | None
    ts: float
    latency_ms: float
    fallback_reason: str | None
    n_candidates: int
    window: int
    items: Displayed
    mode: str = "ab"

    def record(self) -> dict[str, Any]:
        return {
            "kind": "decision",
            "schema_version": SCHEMA_VERSION,
            "request_id": self.request_id,
            "unit_id": self.unit_id,
            "query_id": self.query_id,
            "bucket": self.bucket,
            "arm": self.arm,
            "mode": self.mode,
            "experiment_salt": self.experiment_salt,
            "rollout_percentage": self.rollout_percentage,
            "shadow": self.shadow,
            "model_id": self.model_id,
            "calibrator_version": self.calibrator_version,
            "ts": self.ts,
            "latency_ms": self.latency_ms,
            "fallback": self.fallback_reason is not None,
            "fallback_reason": self.fallback_reason,
            "n_candidates": self.n_candidates,
            "window": self.window,
            "items": self.items.record(),
        }


def displayed_items(results: list[dict[str, Any]], merged: Interleaved | None = None) -> Displayed:
    """The response's results (`core.ranking.build_results`, in final order) as logged columns;
    deterministic: propensity 1. With an interleaved answer (`merged`), the merged window's team and
    competitive flag per position (cut to the displayed length when top_n is shorter)."""
    n = len(results)
    return Displayed(
        item_id=[r["id"] for r in results],
        upstream_index=[r["index"] for r in results],
        score=[r["score"] for r in results],
        probability=[r["probability"] for r in results],
        propensity=[1.0] * n,
        team=list(merged.teams[:n]) if merged is not None else None,
        competitive=list(merged.competitive[:n]) if merged is not None else None,
    )


# Column types for DuckDB's read_json (analysis): an explicit schema, so a log whose first lines
# happen to hold nulls is read the same as any other.
DECISION_COLUMNS = {
    "kind": "VARCHAR",
    "request_id": "VARCHAR",
    "unit_id": "VARCHAR",
    "query_id": "VARCHAR",
    "bucket": "INTEGER",
    "arm": "VARCHAR",
    "mode": "VARCHAR",
    "experiment_salt": "VARCHAR",
    "rollout_percentage": "DOUBLE",
    "shadow": "BOOLEAN",
    "model_id": "VARCHAR",
    "calibrator_version": "VARCHAR",
    "ts": "DOUBLE",
    "latency_ms": "DOUBLE",
    "fallback": "BOOLEAN",
    "fallback_reason": "VARCHAR",
    "n_candidates": "INTEGER",
    "window": "INTEGER",
    "items": "STRUCT(item_id VARCHAR[], upstream_index INTEGER[], score DOUBLE[], probability DOUBLE[], "
    "propensity DOUBLE[], team VARCHAR[], competitive BOOLEAN[])",
}
FEEDBACK_COLUMNS = {
    "kind": "VARCHAR",
    "event_id": "VARCHAR",
    "request_id": "VARCHAR",
    "item_id": "VARCHAR",
    "type": "VARCHAR",
    "timestamp": "DOUBLE",
    "value": "DOUBLE",
    "received_at": "DOUBLE",
    "replica": "VARCHAR",
}
