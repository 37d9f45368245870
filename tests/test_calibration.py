from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.metrics import ece, sigmoid


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overconfident logits: true P(y=1) = sigmoid(z) but the model emits 3*z + noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    labels = (rng.uniform(size=n) < sigmoid(z)).astype(np.float64)
    logits = 3.0 * z + rng.normal(scale=0.5, size=n)
    return logits, labels


@pytest.fixture(scope="module")
def fitted() -> tuple[IsotonicCalibrator, np.ndarray, np.ndarray]:
    x, y = _sample(5000, seed=0)
    return IsotonicCalibrator(min_samples=100).fit(x, y), x, y


def test_fit_returns_self_and_sets_underscore_attrs() -> None:
    x, y = _sample(500, seed=1)
    cal = IsotonicCalibrator(min_samples=10)
    assert not any(k.endswith("_") for k in vars(cal))
    assert cal.fit(x, y) is cal
    for attr in ("x_thresholds_", "y_thresholds_", "n_samples_", "base_rate_", "score_range_"):
        assert hasattr(cal, attr)
    assert cal.x_thresholds_.dtype == np.float64 and cal.y_thresholds_.dtype == np.float64
    assert cal.n_samples_ == 500
    assert cal.base_rate_ == pytest.approx(y.mean())
    assert cal.score_range_ == (x.min(), x.max())


def test_matches_sklearn_including_out_of_range(fitted) -> None:
    cal, x, y = fitted
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True).fit(x, y)
    grid = np.concatenate([np.linspace(x.min() - 5, x.max() + 5, 2001), x[:500], [-1e9, 1e9]])
    np.testing.assert_allclose(cal.predict(grid), ref.predict(grid), rtol=0, atol=1e-12)


def test_matches_sklearn_with_sample_weight() -> None:
    x, y = _sample(800, seed=2)
    w = np.random.default_rng(3).uniform(0.1, 2.0, size=x.size)
    cal = IsotonicCalibrator(min_samples=10).fit(x, y, sample_weight=w)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y, sample_weight=w)
    grid = np.linspace(-20, 20, 501)
    np.testing.assert_allclose(cal.predict(grid), ref.predict(grid), rtol=0, atol=1e-12)


def test_monotone_bounded_and_clipped(fitted) -> None:
    cal, x, _ = fitted
    grid = np.linspace(x.min() - 10, x.max() + 10, 5000)
    p = cal.predict(grid)
    assert p.dtype == np.float64
    assert np.all(np.diff(p) >= 0.0)
    assert np.all((p >= 0.0) & (p <= 1.0))
    assert cal.predict([-1e12])[0] == cal.y_thresholds_[0]
    assert cal.predict([1e12])[0] == cal.y_thresholds_[-1]
    assert cal.transform(grid[:10]).tolist() == p[:10].tolist()


def test_calibrates_held_out_data(fitted) -> None:
    cal, _, _ = fitted
    x_test, y_test = _sample(20000, seed=123)  # different draw from the same distribution
    raw = ece(sigmoid(x_test), y_test)
    calibrated = ece(cal.predict(x_test), y_test)
    assert calibrated < raw
    assert calibrated < 0.03
    assert ece(cal.predict(x_test), y_test, strategy="quantile") < 0.03


def test_round_trip_through_json_is_exact(fitted) -> None:
    cal, x, _ = fitted
    state = json.loads(json.dumps(cal.to_dict()))
    assert state["kind"] == "isotonic" and state["format_version"] == 1
    clone = IsotonicCalibrator.from_dict(state)
    grid = np.concatenate([x, np.linspace(-50, 50, 1001)])
    np.testing.assert_array_equal(clone.predict(grid), cal.predict(grid))
    assert clone.n_samples_ == cal.n_samples_
    assert clone.base_rate_ == cal.base_rate_
    assert clone.score_range_ == cal.score_range_
    assert clone.min_samples == cal.min_samples


def _corrupt(state: dict, **changes) -> dict:
    out = json.loads(json.dumps(state))
    out.update(changes)
    return out


def test_from_dict_rejects_corrupted_state(fitted) -> None:
    cal, _, _ = fitted
    good = cal.to_dict()
    x, y = good["x_thresholds"], good["y_thresholds"]
    bad_cases = {
        "kind": _corrupt(good, kind="platt"),
        "format_version": _corrupt(good, format_version=2),
        "differ in length": _corrupt(good, y_thresholds=y[:-1]),
        "finite": _corrupt(good, x_thresholds=[float("nan")] + x[1:]),
        "x_thresholds must be non-decreasing": _corrupt(good, x_thresholds=x[::-1]),
        "y_thresholds must be non-decreasing": _corrupt(good, y_thresholds=y[::-1]),
        "within": _corrupt(good, y_thresholds=[v * 2 + 0.1 for v in y]),
        "empty": _corrupt(good, x_thresholds=[], y_thresholds=[]),
        "n_samples": _corrupt(good, n_samples=0),
        "score_range": _corrupt(good, score_range=[1.0, -1.0]),
    }
    for match, state in bad_cases.items():
        with pytest.raises(ValueError, match=match):
            IsotonicCalibrator.from_dict(state)
    missing = dict(good)
    del missing["y_thresholds"]
    with pytest.raises(ValueError, match="missing key 'y_thresholds'"):
        IsotonicCalibrator.from_dict(missing)


def test_warns_and_logs_below_min_samples(caplog) -> None:
    x, y = _sample(100, seed=4)
    with caplog.at_level(logging.WARNING, logger="cotrr_ray.core.calibration"):
        with pytest.warns(UserWarning, match="only 100 rows"):
            cal = IsotonicCalibrator().fit(x, y)
    assert any("only 100 rows" in r.getMessage() for r in caplog.records)
    assert cal.n_samples_ == 100


def test_strict_raises_below_min_samples() -> None:
    x, y = _sample(100, seed=4)
    with pytest.raises(ValueError, match="100.*cross-fitted calibration"):
        IsotonicCalibrator(strict=True).fit(x, y)


def test_input_validation() -> None:
    cal = IsotonicCalibrator(min_samples=1)
    with pytest.raises(ValueError, match="length"):
        cal.fit([0.0, 1.0], [1])
    with pytest.raises(ValueError, match="non-finite"):
        cal.fit([0.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        cal.fit([0.0, 1.0], [0, 2])
    with pytest.raises(ValueError, match="empty"):
        cal.fit([], [])


def test_unfitted_predict_raises() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        IsotonicCalibrator().predict([0.0])
    with pytest.raises(RuntimeError, match="not fitted"):
        IsotonicCalibrator().to_dict()
