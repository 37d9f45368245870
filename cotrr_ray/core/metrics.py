"""Ranking and calibration metrics: the single definition used by training, evaluation and serving.

Ranking metrics work on one query at a time (scores and graded labels of its candidates) and are
aggregated per query so that paired comparisons and bootstrap intervals stay possible. Calibration
metrics take predicted probabilities and 0/1 labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from cotrr_ray.core.ranking import descending_order

BinStrategy = Literal["uniform", "quantile"]

# Rows of bootstrap indices drawn at once; caps memory at ~32 MiB of int64 for large query sets.
_BOOT_CHUNK_ELEMS = 1 << 22


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _pair(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _as_1d(scores, "scores")
    y = _as_1d(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} != {y.shape[0]}")
    return s, y


def _ranked_labels(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # The serving order rule (cotrr_ray.core.ranking): descending score, lower original index on
    # ties, so equal scores never reorder candidates nondeterministically.
    return labels[descending_order(scores)]


# ----------------------------------------------------------------------------------- ranking


def dcg_at_k(labels_in_ranked_order: ArrayLike, k: int) -> float:
    """Discounted cumulative gain of the top ``k`` positions.

    Gain is ``2**rel - 1`` and the discount ``1 / log2(rank + 1)`` with 1-based rank.

    Parameters
    ----------
    labels_in_ranked_order : array-like
        Graded relevance labels, already in ranked order.
    k : int
        Cut-off (>= 1); lists shorter than ``k`` are used whole.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = _as_1d(labels_in_ranked_order, "labels_in_ranked_order")[:k]
    if rel.size == 0:
        return 0.0
    discounts = 1.0 / np.log2(np.arange(2, rel.size + 2, dtype=np.float64))
    return float(np.sum((np.exp2(rel) - 1.0) * discounts))


def ndcg_at_k(scores: ArrayLike, labels: ArrayLike, k: int) -> float | None:
    """nDCG@k of one query.

    Candidates are ordered by ``scores`` descending, ties broken by the lower original index.

    Returns
    -------
    float or None
        nDCG in [0, 1], or None when the ideal DCG is 0 (no relevant candidate), so callers can
        skip and count such queries instead of scoring them 0 or 1.
    """
    s, y = _pair(scores, labels)
    ideal = dcg_at_k(np.sort(y)[::-1], k)
    if ideal <= 0.0:
        return None
    return dcg_at_k(_ranked_labels(s, y), k) / ideal


def mrr(scores: ArrayLike, labels: ArrayLike, relevant_threshold: float = 1.0) -> float | None:
    """Reciprocal rank of the first candidate with ``label >= relevant_threshold``.

    Ordering and tie-breaking are as in `ndcg_at_k`. Returns None if no candidate is relevant.
    """
    s, y = _pair(scores, labels)
    hits = np.flatnonzero(_ranked_labels(s, y) >= relevant_threshold)
    if hits.size == 0:
        return None
    return 1.0 / float(hits[0] + 1)


def ranking_report(
    per_query: Sequence[tuple[ArrayLike, ArrayLike]],
    ks: Sequence[int] = (1, 5, 10),
    relevant_threshold: float = 1.0,
) -> dict:
    """Per-query nDCG@k and MRR over a list of queries.

    A query is used only if it has a candidate with ``label >= relevant_threshold`` and a positive
    ideal DCG; otherwise it is skipped and counted. The rule depends on labels only, so two models
    scored on the same queries get aligned arrays that can be compared pairwise.

    Parameters
    ----------
    per_query : sequence of (scores, labels)
        One pair of equal-length 1-D arrays per query.
    ks : sequence of int
        nDCG cut-offs.
    relevant_threshold : float
        Minimum label counted as relevant for MRR and for the skip rule.

    Returns
    -------
    dict
        ``"ndcg@k"`` for each k and ``"mrr"``: float64 arrays with one value per used query, in
        input order; ``"queries"``: number used; ``"skipped"``: number skipped; ``"used_index"``:
        input positions of the used queries.
    """
    ks = tuple(int(k) for k in ks)
    values: dict[str, list[float]] = {f"ndcg@{k}": [] for k in ks}
    values["mrr"] = []
    used: list[int] = []
    for i, (scores, labels) in enumerate(per_query):
        rr = mrr(scores, labels, relevant_threshold)
        ndcgs = [ndcg_at_k(scores, labels, k) for k in ks]
        if rr is None or any(v is None for v in ndcgs):
            continue
        used.append(i)
        values["mrr"].append(rr)
        for k, v in zip(ks, ndcgs):
            values[f"ndcg@{k}"].append(v)  # type: ignore[arg-type]
    report: dict = {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}
    report["queries"] = len(used)
    report["skipped"] = len(per_query) - len(used)
    report["used_index"] = np.asarray(used, dtype=np.int64)
    return report


# --------------------------------------------------------------------------------- bootstrap


def bootstrap_ci(values: ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over queries.

    Parameters
    ----------
    values : array-like
        One value per query.
    n_boot : int
        Number of bootstrap resamples.
    alpha : float
        Two-sided level; the interval covers ``1 - alpha``.
    seed : int
        Seed for ``np.random.default_rng``; equal inputs give equal intervals.
    """
    v = _as_1d(values, "values")
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap_ci values must be finite")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    n = v.size
    rows = max(1, _BOOT_CHUNK_ELEMS // n)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean per-query difference ``a - b``.

    ``a`` and ``b`` must hold the same queries in the same order (e.g. two `ranking_report` arrays).
    """
    a_, b_ = _as_1d(a, "a"), _as_1d(b, "b")
    if a_.shape != b_.shape:
        raise ValueError(f"a and b differ in length: {a_.shape[0]} != {b_.shape[0]}")
    return bootstrap_ci(a_ - b_, n_boot=n_boot, alpha=alpha, seed=seed)


# ------------------------------------------------------------------------------- calibration


def _probs_labels(probs: ArrayLike, labels01: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _as_1d(probs, "probs")
    y = _as_1d(labels01, "labels01")
    if p.shape != y.shape:
        raise ValueError(f"probs and labels01 differ in length: {p.shape[0]} != {y.shape[0]}")
    if p.size == 0:
        raise ValueError("probs is empty")
    if not np.all(np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probs must be finite and within [0, 1]")
    if not np.all(np.isfinite(y)) or np.any((y < 0.0) | (y > 1.0)):
        raise ValueError("labels01 must be finite and within [0, 1]")
    return p, y


def _bin_groups(p: np.ndarray, n_bins: int, strategy: str) -> list[np.ndarray]:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # Digitizing on interior edges maps p == 0 to bin 0 and p == 1 to the last bin.
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
        return [np.flatnonzero(idx == b) for b in range(n_bins)]
    if strategy == "quantile":
        # Quantile edges collapse under ties; splitting the sorted order into equal groups does not.
        order = np.argsort(p, kind="stable")
        return list(np.array_split(order, n_bins))
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_curve(
    probs: ArrayLike, labels01: ArrayLike, n_bins: int = 15, strategy: BinStrategy = "uniform"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean prediction, fraction of positives and count per non-empty bin.

    Binning is as in `ece`. Returns three float64/int64 arrays of equal length.
    """
    p, y = _probs_labels(probs, labels01)
    groups = [g for g in _bin_groups(p, n_bins, strategy) if g.size > 0]
    mean_pred = np.array([p[g].mean() for g in groups], dtype=np.float64)
    frac_pos = np.array([y[g].mean() for g in groups], dtype=np.float64)
    counts = np.array([g.size for g in groups], dtype=np.int64)
    return mean_pred, frac_pos, counts


def ece(probs: ArrayLike, labels01: ArrayLike, n_bins: int = 15, strategy: BinStrategy = "uniform") -> float:
    """Expected calibration error: ``sum_b (n_b / n) * |mean(p_b) - mean(y_b)|``.

    Convention: with ``strategy="uniform"`` the bins are ``n_bins`` equal-width intervals of
    [0, 1], left-closed, with p == 1 in the last bin (so p == 0 and p == 1 both count). With
    ``strategy="quantile"`` the predictions are sorted (stable) and split into ``n_bins``
    nearly equal-size groups, which stays well defined under tied predictions. Empty bins
    contribute nothing.
    """
    mean_pred, frac_pos, counts = reliability_curve(probs, labels01, n_bins, strategy)
    weights = counts / counts.sum()
    return float(np.sum(weights * np.abs(mean_pred - frac_pos)))


def brier(probs: ArrayLike, labels01: ArrayLike) -> float:
    """Mean squared error between probabilities and 0/1 labels."""
    p, y = _probs_labels(probs, labels01)
    return float(np.mean((p - y) ** 2))


def log_loss(probs: ArrayLike, labels01: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to ``[eps, 1 - eps]``."""
    p, y = _probs_labels(probs, labels01)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration_report(probs: ArrayLike, labels01: ArrayLike) -> dict:
    """ECE (equal-width and equal-mass, 15 bins), Brier, log loss, base rate and count."""
    p, y = _probs_labels(probs, labels01)
    return {
        "ece_equal_width": ece(p, y, strategy="uniform"),
        "ece_equal_mass": ece(p, y, strategy="quantile"),
        "brier": brier(p, y),
        "log_loss": log_loss(p, y),
        "base_rate": float(y.mean()),
        "n": int(y.size),
    }


def sigmoid(x: ArrayLike) -> np.ndarray | float:
    """Numerically stable logistic function; returns a float for scalar input."""
    arr = np.asarray(x, dtype=np.float64)
    # exp of a non-positive argument never overflows.
    e = np.exp(-np.abs(arr))
    out = np.where(arr >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------- ranking agreement


def _positions(order: Sequence[str], name: str) -> dict[str, int]:
    pos = {item: i for i, item in enumerate(order)}
    if len(pos) != len(order):
        raise ValueError(f"{name} contains duplicate ids")
    return pos


def _count_inversions(seq: list[int]) -> int:
    # Bottom-up merge sort: O(n log n) without recursion limits or an n x n pair matrix.
    arr = list(seq)
    n = len(arr)
    inversions = 0
    width = 1
    while width < n:
        merged: list[int] = []
        for lo in range(0, n, 2 * width):
            left = arr[lo : lo + width]
            right = arr[lo + width : lo + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if left[i] <= right[j]:
                    merged.append(left[i])
                    i += 1
                else:
                    merged.append(right[j])
                    inversions += len(left) - i
                    j += 1
            merged.extend(left[i:])
            merged.extend(right[j:])
        arr = merged
        width *= 2
    return inversions


def kendall_tau(order_a: Sequence[str], order_b: Sequence[str]) -> float:
    """Kendall's tau between two rankings over the ids present in both.

    Rankings are strict orders (no ties), so tau-b equals tau-a:
    ``1 - 2 * discordant_pairs / n_pairs``. Returns 1.0 for identical relative orders, -1.0 for
    reversed ones, and 1.0 when fewer than two ids are shared.
    """
    pos_a = _positions(order_a, "order_a")
    pos_b = _positions(order_b, "order_b")
    common = sorted((pos_a[i], pos_b[i]) for i in pos_a.keys() & pos_b.keys())
    n = len(common)
    if n < 2:
        return 1.0
    discordant = _count_inversions([b for _, b in common])
    return 1.0 - 2.0 * discordant / (n * (n - 1) / 2.0)


def overlap_at_k(order_a: Sequence[str], order_b: Sequence[str], k: int = 10) -> float:
    """Share of the top-``k`` ids the two rankings have in common.

    ``|top_k(a) & top_k(b)| / min(k, len(a), len(b))``; 1.0 when both are empty, 0.0 when only
    one is.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _positions(order_a, "order_a")
    _positions(order_b, "order_b")
    denom = min(k, len(order_a), len(order_b))
    if denom == 0:
        return 1.0 if len(order_a) == len(order_b) == 0 else 0.0
    return len(set(order_a[:k]) & set(order_b[:k])) / denom
