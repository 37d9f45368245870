"""Isotonic probability calibration of raw reranker scores, stored as plain JSON-safe arrays."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.isotonic import IsotonicRegression

logger = logging.getLogger(__name__)

_KIND = "isotonic"
_FORMAT_VERSION = 1


def _check_scores(scores: ArrayLike) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite value(s)")
    return s


class IsotonicCalibrator:
    """Monotone map from a raw score (logit) to P(label = 1), fitted by isotonic regression.

    The fitted state is two threshold arrays; prediction is linear interpolation between them,
    clipped to the end values outside the fitted score range.

    Ordering must always use the raw score: the isotonic map is only non-decreasing, so distinct
    scores can share a probability and sorting by it would create ties. Report the probability
    beside the score, never instead of it.

    Parameters
    ----------
    min_samples : int
        Fewer calibration rows than this triggers a warning, or a ValueError if ``strict``.
    strict : bool
        Raise instead of warning when there are too few rows.
    """

    def __init__(self, *, min_samples: int = 1000, strict: bool = False) -> None:
        self.min_samples = min_samples
        self.strict = strict

    def fit(self, scores: ArrayLike, labels01: ArrayLike, sample_weight: ArrayLike | None = None) -> IsotonicCalibrator:
        """Fit on raw scores and 0/1 labels.

        Isotonic regression is invariant to monotone transforms of the input, so the raw logit is
        used directly rather than its sigmoid.
        """
        s = _check_scores(scores)
        y = np.asarray(labels01, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"labels01 must be 1-D, got shape {y.shape}")
        if y.shape != s.shape:
            raise ValueError(f"scores and labels01 differ in length: {s.size} != {y.size}")
        if not np.all((y == 0.0) | (y == 1.0)):
            raise ValueError("labels01 must contain only 0 and 1")
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight, dtype=np.float64)
            if w.shape != s.shape:
                raise ValueError(f"sample_weight length {w.size} != scores length {s.size}")
            if not np.all(np.isfinite(w)) or np.any(w < 0.0):
                raise ValueError("sample_weight must be finite and non-negative")

        n = int(s.size)
        if n < self.min_samples:
            msg = (
                f"IsotonicCalibrator fitted on only {n} rows (min_samples={self.min_samples}); "
                "the probabilities will be noisy: use more calibration queries or cross-fitted "
                "calibration"
            )
            if self.strict:
                raise ValueError(msg)
            # Both channels: warnings reach notebooks and tests, the log reaches training jobs.
            warnings.warn(msg, UserWarning, stacklevel=2)
            logger.warning(msg)

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(s, y, sample_weight=w)
        self.x_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64).copy()
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64).copy()
        self.n_samples_ = n
        self.base_rate_ = float(np.average(y, weights=w if w is not None and w.sum() > 0 else None))
        self.score_range_ = (float(s.min()), float(s.max()))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "x_thresholds_"):
            raise RuntimeError("IsotonicCalibrator is not fitted; call fit() first")

    def predict(self, scores: ArrayLike) -> np.ndarray:
        """Calibrated probabilities (float64 in [0, 1]) for raw scores of any shape.

        Raises ValueError on non-finite scores, which would otherwise pass through as NaN.
        """
        self._check_fitted()
        s = np.asarray(scores, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain non-finite values")
        # np.interp holds the end values outside [x_0, x_-1], matching out_of_bounds="clip".
        return np.interp(s, self.x_thresholds_, self.y_thresholds_)

    transform = predict

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fitted state (plain lists, floats and ints)."""
        self._check_fitted()
        return {
            "kind": _KIND,
            "format_version": _FORMAT_VERSION,
            "min_samples": int(self.min_samples),
            "strict": bool(self.strict),
            "x_thresholds": [float(v) for v in self.x_thresholds_],
            "y_thresholds": [float(v) for v in self.y_thresholds_],
            "n_samples": int(self.n_samples_),
            "base_rate": float(self.base_rate_),
            "score_range": [float(self.score_range_[0]), float(self.score_range_[1])],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IsotonicCalibrator:
        """Rebuild a fitted calibrator from `to_dict` output, validating it first."""
        if not isinstance(d, dict):
            raise ValueError(f"calibrator state must be a dict, got {type(d).__name__}")
        if d.get("kind") != _KIND:
            raise ValueError(f"calibrator kind must be {_KIND!r}, got {d.get('kind')!r}")
        if d.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"unsupported calibrator format_version {d.get('format_version')!r} (expected {_FORMAT_VERSION})"
            )
        try:
            x = np.asarray(d["x_thresholds"], dtype=np.float64)
            y = np.asarray(d["y_thresholds"], dtype=np.float64)
            n_samples = d["n_samples"]
            base_rate = float(d["base_rate"])
            lo, hi = (float(v) for v in d["score_range"])
        except KeyError as exc:
            raise ValueError(f"calibrator state is missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibrator state has malformed values: {exc}") from None

        if x.ndim != 1 or y.ndim != 1:
            raise ValueError("x_thresholds and y_thresholds must be flat lists")
        if x.size == 0:
            raise ValueError("x_thresholds is empty")
        if x.size != y.size:
            raise ValueError(f"x_thresholds and y_thresholds differ in length: {x.size} != {y.size}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("thresholds must be finite")
        if np.any(np.diff(x) < 0.0):
            raise ValueError("x_thresholds must be non-decreasing")
        if np.any(np.diff(y) < 0.0):
            raise ValueError("y_thresholds must be non-decreasing")
        if np.any((y < 0.0) | (y > 1.0)):
            raise ValueError("y_thresholds must lie within [0, 1]")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not (math.isfinite(base_rate) and 0.0 <= base_rate <= 1.0):
            raise ValueError(f"base_rate must be within [0, 1], got {base_rate!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"score_range must be finite with min <= max, got {[lo, hi]!r}")

        cal = cls(min_samples=int(d.get("min_samples", 1000)), strict=bool(d.get("strict", False)))
        cal.x_thresholds_ = x
        cal.y_thresholds_ = y
        cal.n_samples_ = int(n_samples)
        cal.base_rate_ = base_rate
        cal.score_range_ = (lo, hi)
        return cal

    def __repr__(self) -> str:
        state = f", n_samples_={self.n_samples_}" if hasattr(self, "x_thresholds_") else ""
        return f"IsotonicCalibrator(min_samples={self.min_samples}, strict={self.strict}{state})"
