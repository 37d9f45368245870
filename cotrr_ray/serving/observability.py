"""What the router records about the requests it handled, in four sinks.

- `Metrics`: the Prometheus-style counters, gauges and histograms (`deployments.ServeMetrics` in
  Serve, `NullMetrics` elsewhere);
- `ExposureLog`: one JSON line per decision (which arm, which model, fallback), for experiment analysis;
- `ServingStats`: the in-process counters of one router replica, served by `GET /v1/stats`, with its
  sliding windows (`RecentTraffic`: fallback ratio per arm; `ModelVersions`: which bundle ids answered, when);
- `RateLimitedLog`: warnings of recurring downstream failures, at most one per reason per interval.

`RerankService` feeds all of them; nothing here decides anything.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from cotrr_ray.config import RoutingConfig
from cotrr_ray.serving.errors import exception_name

logger = logging.getLogger(__name__)


class Metrics(Protocol):
    """The metric events of the router (one call each); `deployments.ServeMetrics` exports them."""

    def request(self, arm: str, outcome: str, latency_ms: float) -> None: ...
    def rejected(self, code: str) -> None: ...
    def fallback(self, reason: str) -> None: ...
    def calibration_failure(self, reason: str) -> None: ...
    def shadow(self, outcome: str, comparison: dict[str, float] | None, latency_ms: float | None) -> None: ...
    def routing(self, config: RoutingConfig) -> None: ...
    def response_model(self, model_version: str) -> None: ...
    def feedback(self, outcome: str, event_type: str, n: int) -> None:
        """`n` feedback events of one type: outcome accepted, duplicate or rejected (type "-" when the
        body was refused before its events could be read)."""

    def event_log_commit(self, kind: str, records: int, latency_ms: float) -> None:
        """One group commit of the event log (called from its writer thread): enqueue-to-fsync time."""

    def segment_rotated(self, kind: str, reason: str) -> None:
        """An event-log segment closed (size, age, date, close)."""

    def window(self, fallback_ratio: dict[str, float], model_versions: int) -> None:
        """The sliding-window gauges, at most once a second: fallbacks / served per arm, and the number
        of distinct treatment bundle ids that answered within the window (>1: replicas disagree)."""


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


def describe_error(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of the user-level exception (Ray's `RayTaskError` wrapper unwrapped: its own
    text repeats the remote traceback), cut to `limit` characters."""
    cause = getattr(e, "cause", None)
    inner = cause if isinstance(cause, BaseException) else e
    text = str(inner).strip().splitlines()
    return f"{exception_name(e)}: {text[0] if text else ''}"[:limit].rstrip(": ")


class RateLimitedLog:
    """Records of a recurring failure, at `level`: at most one per reason per `interval_s`.

    A scorer that fails every request would otherwise log from the router on every request, the
    busiest process of the box; the first failure is logged at once, with the exception (and its
    traceback unless it is a timeout, whose traceback says nothing), later ones of the same reason
    only once the interval has passed, with the count of those suppressed meanwhile.
    """

    def __init__(
        self, log: logging.Logger, interval_s: float = 60.0, *, level: int = logging.WARNING, clock=time.monotonic
    ):
        self._log = log
        self.interval_s = interval_s
        self.level = level
        self._clock = clock
        self._state: dict[str, list] = {}  # reason -> [time of its last record, suppressed since]

    def log(self, reason: str, message: str, error: BaseException | None = None) -> bool:
        """Log `message` (and `error`) for `reason` unless it was logged less than `interval_s` ago;
        True when a record was written."""
        now = self._clock()
        state = self._state.get(reason)
        if state is not None and now - state[0] < self.interval_s:
            state[1] += 1
            return False
        suppressed, since_s = (state[1], now - state[0]) if state is not None else (0, 0.0)
        self._state[reason] = [now, 0]
        detail = f": {describe_error(error)}" if error is not None else ""
        tail = f" ({suppressed} more since the last record {since_s:.0f} s ago)" if suppressed else ""
        traceback = error if error is not None and not isinstance(error, TimeoutError) else None
        self._log.log(
            self.level,
            "%s [%s]%s%s",
            message,
            reason,
            detail,
            tail,
            exc_info=traceback,
            extra={"reason": reason, "suppressed": suppressed},
        )
        return True


class RecentTraffic:
    """Served responses and fallbacks per arm over the last `window_s` seconds, in one-second buckets.

    The window's totals are kept as running sums: a request adds to the current bucket, and entering
    a new second subtracts the buckets that fall out. O(1) per request, whatever the rate (no deque
    of every request to trim and sum on the router's hot path).
    """

    def __init__(self, window_s: int = 60):
        if window_s < 1:
            raise ValueError("window_s must be >= 1")
        self.window_s = window_s
        self._second: int | None = None  # the second of the newest bucket
        self._served: dict[str, list[int]] = {}  # arm -> ring of per-second counts
        self._fallbacks: dict[str, list[int]] = {}
        self.served: collections.Counter = collections.Counter()  # arm -> in the window
        self.fallbacks: collections.Counter = collections.Counter()

    def add(self, now: float, arm: str, fallback: bool) -> bool:
        """Count one served response at `now` (time.time()); True when it opened a new second."""
        second = int(now)
        opened = self._second is None or second > self._second
        if opened:
            self._advance(second)
        if arm not in self._served:
            self._served[arm] = [0] * self.window_s
            self._fallbacks[arm] = [0] * self.window_s
        i = self._second % self.window_s  # a clock stepping back counts in the newest bucket
        self._served[arm][i] += 1
        self.served[arm] += 1
        if fallback:
            self._fallbacks[arm][i] += 1
            self.fallbacks[arm] += 1
        return opened

    def _advance(self, second: int) -> None:
        # Clear the buckets of the seconds entered since the newest one (all of them after a long gap).
        start = second - self.window_s + 1
        if self._second is not None:
            start = max(start, self._second + 1)
        for s in range(start, second + 1):
            i = s % self.window_s
            for arm, ring in self._served.items():
                self.served[arm] -= ring[i]
                ring[i] = 0
            for arm, ring in self._fallbacks.items():
                self.fallbacks[arm] -= ring[i]
                ring[i] = 0
        self._second = second

    def ratios(self, now: float | None = None) -> dict[str, float]:
        """fallbacks / served per arm over the window ending at `now` (arms with no traffic left out)."""
        if now is not None and self._second is not None and int(now) > self._second:
            self._advance(int(now))
        return {arm: self.fallbacks[arm] / n for arm, n in self.served.items() if n}


class ModelVersions:
    """Which bundle ids answered, and when (time.time()): the version skew of a hot swap or alias move.

    While Scorer replicas converge on a new bundle, treatment answers come from two ids at once; the
    skew window is the time between the new id's `first_seen` and the old id's `last_seen`.
    Entries are kept for the replica's life: a few per swap.
    """

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._seen: dict[str, list] = {}  # id -> [first_seen, last_seen, responses]

    def add(self, model_version: str, now: float) -> None:
        entry = self._seen.get(model_version)
        if entry is None:
            self._seen[model_version] = [now, now, 1]
        else:
            entry[1] = now
            entry[2] += 1

    def recent(self, now: float) -> dict[str, float]:
        """id -> last_seen of the ids that answered within the window."""
        return {v: e[1] for v, e in self._seen.items() if now - e[1] <= self.window_s}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            v: {"first_seen": round(e[0], 3), "last_seen": round(e[1], 3), "responses": e[2]}
            for v, e in self._seen.items()
        }


@dataclass
class ServingStats:
    """Counters of one router replica (GET /v1/stats).

    `requests` counts every rerank request that reached the router (bodies refused before parsing
    included). A finished one was answered 200 (`served`; `fallbacks` of those in upstream order
    because a scorer failed or timed out), 4xx (`rejected`, by error code) or 500 (`internal_errors`:
    an unexpected exception, a bug). Requests refused by Serve itself (503 when the replica's queue is
    full) never reach the router and are not counted. The rates, over `requests`:

    - fallback_rate = sum(fallbacks) / requests: answered 200 in upstream order (not an error);
    - reject_rate = sum(rejected) / requests: answered 4xx;
    - error_rate = (sum(rejected) + internal_errors) / requests: answered with an error status (4xx or 5xx).

    All three are 0.0 before the first request. `fallback_ratio` is the same as fallback_rate over
    the last `recent.window_s` seconds only, per arm and for all arms (served responses, not
    requests); `by_model` counts served responses by the bundle id that ordered them, and
    `model_versions` lists the treatment bundle ids that answered (served or shadow), with when.
    """

    requests: int = 0
    served: int = 0
    reranked: int = 0
    by_arm: collections.Counter = field(default_factory=collections.Counter)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    internal_errors: int = 0
    calibration_failures: collections.Counter = field(default_factory=collections.Counter)
    shadow: collections.Counter = field(default_factory=collections.Counter)
    shadow_tau_sum: float = 0.0
    shadow_overlap_sum: float = 0.0
    last_shadow: dict[str, Any] | None = None
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    shadow_latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))
    by_model: collections.Counter = field(default_factory=collections.Counter)
    feedback: collections.Counter = field(default_factory=collections.Counter)  # batches, accepted, duplicates, ...
    event_log_errors: int = 0  # decision records or feedback batches the event log failed to write
    recent: RecentTraffic = field(default_factory=RecentTraffic)
    versions: ModelVersions = field(default_factory=ModelVersions)

    @staticmethod
    def _percentiles(values: collections.deque) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        p = np.percentile(np.fromiter(values, float), [50, 95, 99])
        return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}

    def _rate(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    def _fallback_ratio(self, now: float) -> dict[str, Any]:
        by_arm = self.recent.ratios(now)
        served = sum(self.recent.served.values())
        return {
            "window_s": self.recent.window_s,
            "all": sum(self.recent.fallbacks.values()) / served if served else None,
            "by_arm": by_arm,
            "served": served,
        }

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        ok = self.shadow["ok"]
        fallbacks, rejected = sum(self.fallbacks.values()), sum(self.rejected.values())
        return {
            "requests": self.requests,
            "served": self.served,
            "reranked": self.reranked,
            "by_arm": dict(self.by_arm),
            "fallbacks": dict(self.fallbacks),
            "rejected": dict(self.rejected),
            "calibration_failures": dict(self.calibration_failures),
            "internal_errors": self.internal_errors,
            "fallback_rate": self._rate(fallbacks),
            "reject_rate": self._rate(rejected),
            "error_rate": self._rate(rejected + self.internal_errors),
            "latency_ms": {**self._percentiles(self.latencies_ms), "window": len(self.latencies_ms)},
            "fallback_ratio": self._fallback_ratio(now),
            "by_model": dict(self.by_model),
            "feedback": dict(self.feedback),
            "event_log_errors": self.event_log_errors,
            "model_versions": self.versions.snapshot(),
            "model_versions_recent": {v: round(t, 3) for v, t in self.versions.recent(now).items()},
            "shadow": {
                "comparisons": ok,
                "errors": self.shadow["error"],
                "timeouts": self.shadow["timeout"],
                "dropped": self.shadow["dropped"],
                "paused": self.shadow["paused"],
                "mean_kendall_tau": self.shadow_tau_sum / ok if ok else None,
                "mean_overlap_at_10": self.shadow_overlap_sum / ok if ok else None,
                "latency_ms": self._percentiles(self.shadow_latencies_ms),
                "last": self.last_shadow,
            },
        }
