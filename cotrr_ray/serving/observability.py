"""What the router records about the requests it handled, in three sinks.

- `Metrics`: the Prometheus-style counters and histograms (`deployments.ServeMetrics` in Serve,
  `NullMetrics` elsewhere);
- `ExposureLog`: one JSON line per decision (which arm, which model, fallback), for experiment analysis;
- `ServingStats`: the in-process counters of one router replica, served by `GET /v1/stats`.

`RerankService` feeds all three; nothing here decides anything.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from cotrr_ray.config import RoutingConfig

logger = logging.getLogger(__name__)


class Metrics(Protocol):
    """The metric events of the router (one call each); `deployments.ServeMetrics` exports them."""

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
    """Counters of one router replica (GET /v1/stats).

    `requests` counts every rerank request that reached the router (bodies refused before parsing
    included). A finished one was answered 200 (`served`; `fallbacks` of those in upstream order
    because a scorer failed or timed out), 4xx (`rejected`, by error code) or 500 (`internal_errors`:
    an unexpected exception, a bug). Requests refused by Serve itself (503 when the replica's queue is
    full) never reach the router and are not counted. The rates, over `requests`:

    - fallback_rate = sum(fallbacks) / requests: answered 200 in upstream order (not an error);
    - reject_rate = sum(rejected) / requests: answered 4xx;
    - error_rate = (sum(rejected) + internal_errors) / requests: answered with an error status (4xx or 5xx).

    All three are 0.0 before the first request.
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

    @staticmethod
    def _percentiles(values: collections.deque) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        p = np.percentile(np.fromiter(values, float), [50, 95, 99])
        return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}

    def _rate(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    def snapshot(self) -> dict[str, Any]:
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
