from __future__ import annotations

import math

import numpy as np
import pytest

from cotrr_ray.core.metrics import (
    bootstrap_ci,
    brier,
    calibration_report,
    dcg_at_k,
    ece,
    kendall_tau,
    log_loss,
    mrr,
    ndcg_at_k,
    overlap_at_k,
    paired_bootstrap_ci,
    ranking_report,
    reliability_curve,
    sigmoid,
)

# Labels in ranked order [3, 2, 3, 0, 1, 2]; gains 2^rel - 1 = [7, 3, 7, 0, 1, 3].
# DCG@6  = 7/1 + 3/log2(3) + 7/2 + 0/log2(5) + 1/log2(6) + 3/log2(7)
#        = 7 + 1.892789 + 3.5 + 0 + 0.386853 + 1.068622 = 13.848264
# ideal [3, 3, 2, 2, 1, 0]:
# IDCG@6 = 7 + 7/log2(3) + 3/2 + 3/log2(5) + 1/log2(6) + 0
#        = 7 + 4.416508 + 1.5 + 1.292030 + 0.386853 = 14.595391  -> nDCG@6 = 0.948811
# DCG@3  = 12.392789, IDCG@3 = 12.916508 -> nDCG@3 = 0.959454
RANKED = np.array([3, 2, 3, 0, 1, 2], dtype=float)


def test_dcg_hand_computed() -> None:
    assert dcg_at_k(RANKED, 6) == pytest.approx(13.848264, abs=1e-6)
    assert dcg_at_k(RANKED, 100) == pytest.approx(13.848264, abs=1e-6)
    assert dcg_at_k(RANKED, 1) == pytest.approx(7.0)
    assert dcg_at_k([], 5) == 0.0
    with pytest.raises(ValueError):
        dcg_at_k(RANKED, 0)


def test_ndcg_hand_computed_and_order_independent() -> None:
    scores = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert ndcg_at_k(scores, RANKED, 6) == pytest.approx(0.948811, abs=1e-6)
    assert ndcg_at_k(scores, RANKED, 3) == pytest.approx(0.959454, abs=1e-6)
    # Same ranking presented in a shuffled input order gives the same value.
    perm = np.array([4, 0, 5, 2, 1, 3])
    assert ndcg_at_k(scores[perm], RANKED[perm], 6) == pytest.approx(0.948811, abs=1e-6)
    # Scoring by the labels themselves is ideal.
    assert ndcg_at_k(RANKED, RANKED, 6) == pytest.approx(1.0)


def test_ties_broken_by_lower_index() -> None:
    scores = np.zeros(3)
    # Order stays [0, 1, 2]: relevant item at rank 2 -> 1/log2(3), MRR 1/2.
    assert ndcg_at_k(scores, [0, 1, 0], 3) == pytest.approx(1.0 / math.log2(3))
    assert mrr(scores, [0, 1, 0]) == pytest.approx(0.5)
    assert mrr(scores, [1, 1, 0]) == pytest.approx(1.0)
    # Only the tied pair is resolved by index; higher scores still come first.
    assert mrr([0.0, 0.0, 1.0], [0, 1, 0]) == pytest.approx(1.0 / 3.0)


def test_none_without_relevant_items() -> None:
    assert ndcg_at_k([0.3, 0.2], [0, 0], 10) is None
    assert mrr([0.3, 0.2], [0, 0]) is None
    # Graded label below the MRR threshold: relevant for nDCG but not for MRR.
    assert mrr([0.3, 0.2], [0, 0.5]) is None
    assert mrr([0.3, 0.2], [0, 0.5], relevant_threshold=0.5) == pytest.approx(0.5)


def test_mrr_first_relevant() -> None:
    assert mrr([0.9, 0.8, 0.7, 0.1], [0, 0, 2, 1]) == pytest.approx(1.0 / 3.0)
    assert mrr([0.9, 0.8, 0.7, 0.1], [0, 0, 2, 1], relevant_threshold=2) == pytest.approx(1.0 / 3.0)


def test_length_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="length"):
        ndcg_at_k([1.0, 2.0], [1.0], 5)


def test_ranking_report_skips_and_aligns() -> None:
    queries = [
        (np.array([2.0, 1.0]), np.array([1.0, 0.0])),  # perfect
        (np.array([2.0, 1.0]), np.array([0.0, 0.0])),  # no relevant -> skipped
        (np.array([2.0, 1.0]), np.array([0.0, 1.0])),  # relevant at rank 2
    ]
    rep = ranking_report(queries, ks=(1, 5))
    assert rep["queries"] == 2 and rep["skipped"] == 1
    np.testing.assert_array_equal(rep["used_index"], [0, 2])
    np.testing.assert_allclose(rep["ndcg@1"], [1.0, 0.0])
    np.testing.assert_allclose(rep["ndcg@5"], [1.0, 1.0 / math.log2(3)])
    np.testing.assert_allclose(rep["mrr"], [1.0, 0.5])
    assert set(rep) == {"ndcg@1", "ndcg@5", "mrr", "queries", "skipped", "used_index"}


def test_bootstrap_ci_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(0.5, 0.2, size=50)
    large = rng.normal(0.5, 0.2, size=5000)
    lo_s, hi_s = bootstrap_ci(small, n_boot=500)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert bootstrap_ci(small, n_boot=500, seed=3) == bootstrap_ci(small, n_boot=500, seed=3)
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_bootstrap_ci() -> None:
    rng = np.random.default_rng(2)
    b = rng.uniform(size=400)
    a = b + 0.05 + rng.normal(0, 0.01, size=400)
    lo, hi = paired_bootstrap_ci(a, b, n_boot=500)
    assert 0.0 < lo <= 0.05 <= hi
    # Pairing removes the large per-query variance an unpaired interval would carry.
    assert hi - lo < 0.01
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:-1])


def test_ece_perfectly_calibrated_is_small_and_miscalibrated_large() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(float)
    assert ece(p, y) < 0.02
    assert ece(p, y, strategy="quantile") < 0.02
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    assert ece(overconfident, y) > 0.2
    coin = (rng.uniform(size=p.size) < 0.5).astype(float)
    assert ece(np.full(p.size, 0.9), coin) > 0.35


def test_ece_hand_computed() -> None:
    # Bin [0.1, 0.2): conf 0.1, acc 0.5; bin [0.9, 1.0]: conf 0.9, acc 1.0; each weight 1/2.
    expected = 0.5 * 0.4 + 0.5 * 0.1
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1], n_bins=10) == pytest.approx(expected)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_counts_endpoints(strategy: str) -> None:
    probs = np.array([0.0, 0.0, 1.0, 1.0])
    labels = np.array([1.0, 1.0, 0.0, 0.0])
    assert ece(probs, labels, strategy=strategy) == pytest.approx(1.0)
    _, _, counts = reliability_curve(probs, labels, strategy=strategy)
    assert counts.sum() == 4


def test_uniform_bins_place_one_in_last_bin() -> None:
    mean_pred, frac_pos, counts = reliability_curve([0.0, 0.95, 1.0], [0, 1, 1], n_bins=10)
    np.testing.assert_allclose(mean_pred, [0.0, 0.975])
    np.testing.assert_allclose(frac_pos, [0.0, 1.0])
    np.testing.assert_array_equal(counts, [1, 2])


def test_equal_mass_with_ties() -> None:
    probs = np.full(100, 0.5)
    labels = np.tile([0.0, 1.0], 50)
    _, _, counts = reliability_curve(probs, labels, n_bins=10, strategy="quantile")
    np.testing.assert_array_equal(counts, np.full(10, 10))
    assert ece(probs, labels, n_bins=10, strategy="quantile") == pytest.approx(0.0)
    # Heavy ties plus a few distinct values: still n_bins nearly equal groups.
    probs2 = np.concatenate([np.zeros(90), np.linspace(0.1, 1.0, 17)])
    _, _, counts2 = reliability_curve(probs2, np.zeros(107), n_bins=15, strategy="quantile")
    assert counts2.sum() == 107 and counts2.max() - counts2.min() <= 1 and counts2.size == 15


def test_ece_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ece([1.2], [1])
    with pytest.raises(ValueError):
        ece([0.5], [1], strategy="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ece([], [])


def test_brier_log_loss_and_report() -> None:
    assert brier([1.0, 0.0], [1, 0]) == 0.0
    assert brier([0.5, 0.5], [1, 0]) == pytest.approx(0.25)
    assert log_loss([0.5, 0.5], [1, 0]) == pytest.approx(math.log(2))
    assert math.isfinite(log_loss([0.0, 1.0], [1, 0]))
    assert log_loss([0.0], [1], eps=1e-7) == pytest.approx(-math.log(1e-7))
    rep = calibration_report([0.2, 0.8, 0.6, 0.4], [0, 1, 1, 0])
    assert set(rep) == {"ece_equal_width", "ece_equal_mass", "brier", "log_loss", "base_rate", "n"}
    assert rep["n"] == 4 and rep["base_rate"] == pytest.approx(0.5)


def test_sigmoid_stable() -> None:
    out = sigmoid(np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.0, 1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-1)), 1.0])
    assert isinstance(sigmoid(0.0), float)


def test_kendall_tau() -> None:
    order = list("abcd")
    assert kendall_tau(order, order) == pytest.approx(1.0)
    assert kendall_tau(order, order[::-1]) == pytest.approx(-1.0)
    # One adjacent swap: 1 discordant pair of 6 -> 1 - 2/6.
    assert kendall_tau(order, list("bacd")) == pytest.approx(2.0 / 3.0)
    # Only shared ids count; 'x' and 'y' are ignored.
    assert kendall_tau(list("axbc"), list("abyc")) == pytest.approx(1.0)
    assert kendall_tau(["a"], ["a", "b"]) == 1.0
    assert kendall_tau([], []) == 1.0
    with pytest.raises(ValueError, match="duplicate"):
        kendall_tau(["a", "a"], ["a"])


def test_kendall_tau_matches_bruteforce() -> None:
    rng = np.random.default_rng(5)
    ids = [f"c{i}" for i in range(40)]
    other = list(rng.permutation(ids))
    pos_b = {c: i for i, c in enumerate(other)}
    s = 0
    for i in range(40):
        for j in range(i + 1, 40):
            s += 1 if pos_b[ids[i]] < pos_b[ids[j]] else -1
    assert kendall_tau(ids, other) == pytest.approx(s / (40 * 39 / 2))


def test_overlap_at_k() -> None:
    a = [f"c{i}" for i in range(20)]
    assert overlap_at_k(a, a, k=10) == 1.0
    assert overlap_at_k(a, a[::-1], k=10) == 0.0
    assert overlap_at_k(a, a[5:] + a[:5], k=10) == pytest.approx(0.5)
    assert overlap_at_k(a[:3], a[:3][::-1], k=10) == 1.0  # denominator min(k, len)
    assert overlap_at_k([], [], k=5) == 1.0
    with pytest.raises(ValueError):
        overlap_at_k(a, a, k=0)
