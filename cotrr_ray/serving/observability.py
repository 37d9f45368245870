"""What the router records about its decisions: the metrics protocol, exposure records, `/v1/stats` counters."""

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
