"""Ordering and merging rules of the rerank response (cotrr_ray.core.ranking)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cotrr_ray.core.ranking import agreement, build_results, model_order, upstream_order

IDS = [f"c{i}" for i in range(10)]


def test_window_sorted_by_logit_then_tail_in_upstream_order() -> None:
    logits = np.array([0.1, 2.0, -1.0, 0.5], np.float32)
    order = model_order(logits, 10)
    assert order.tolist() == [1, 3, 0, 2, 4, 5, 6, 7, 8, 9]


def test_ties_keep_upstream_order() -> None:
    logits = np.array([1.0, 3.0, 1.0, 3.0, 1.0], np.float32)
    assert model_order(logits, 6).tolist() == [1, 3, 0, 2, 4, 5]


def test_full_window_and_single_candidate() -> None:
    assert model_order(np.array([0.0, 1.0]), 2).tolist() == [1, 0]
    assert model_order(np.array([5.0]), 1).tolist() == [0]
    assert model_order(np.array([5.0]), 3).tolist() == [0, 1, 2]


def test_more_logits_than_candidates_is_an_error() -> None:
    with pytest.raises(ValueError):
        model_order(np.zeros(3), 2)


def test_results_fields_for_reranked_and_passthrough() -> None:
    logits = np.array([0.1, 2.0, -1.0], np.float32)
    probs = np.array([0.4, 0.9, 0.1])
    order = model_order(logits, 5)
    res = build_results(IDS[:5], order, window=3, logits=logits, probabilities=probs)
    assert [r["id"] for r in res] == ["c1", "c0", "c2", "c3", "c4"]
    assert [r["rank"] for r in res] == [0, 1, 2, 3, 4]
    assert [r["index"] for r in res] == [1, 0, 2, 3, 4]
    assert [r["reranked"] for r in res] == [True, True, True, False, False]
    assert res[0]["score"] == pytest.approx(2.0) and res[0]["probability"] == pytest.approx(0.9)
    assert res[3]["score"] is None and res[3]["probability"] is None
    scores = [r["score"] for r in res if r["reranked"]]
    assert scores == sorted(scores, reverse=True)


def test_results_without_probabilities_or_model() -> None:
    logits = np.array([1.0, 2.0])
    res = build_results(IDS[:3], model_order(logits, 3), window=2, logits=logits, probabilities=None)
    assert all(r["probability"] is None for r in res) and res[0]["score"] == 2.0
    up = build_results(IDS[:4], upstream_order(4), window=2)
    assert [r["id"] for r in up] == IDS[:4]
    assert all(r["score"] is None and r["probability"] is None and not r["reranked"] for r in up)


def test_top_n_truncates_the_final_order_only() -> None:
    logits = np.array([0.0, 1.0, 2.0])
    order = model_order(logits, 6)
    res = build_results(IDS[:6], order, window=3, logits=logits, top_n=2)
    assert [r["id"] for r in res] == ["c2", "c1"]
    assert len(build_results(IDS[:6], order, window=3, logits=logits, top_n=100)) == 6
    tail = build_results(IDS[:6], order, window=3, logits=logits, top_n=5)
    assert [r["id"] for r in tail] == ["c2", "c1", "c0", "c3", "c4"]


def test_agreement_between_orders() -> None:
    same = agreement(IDS, upstream_order(10), upstream_order(10), window=4)
    assert same == {"kendall_tau": 1.0, "overlap_at_10": 1.0}
    reversed_window = np.concatenate([np.arange(4)[::-1], np.arange(4, 10)])
    r = agreement(IDS, upstream_order(10), reversed_window, window=4)
    assert r["kendall_tau"] == -1.0 and r["overlap_at_10"] == 1.0
    assert (
        agreement(IDS + [f"x{i}" for i in range(10)], np.arange(20), np.r_[10:20, 0:10], window=20)["overlap_at_10"]
        == 0.0
    )


@given(
    st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), min_size=1, max_size=12),
    st.integers(min_value=0, max_value=10),
)
def test_model_order_properties(values: list[float], extra: int) -> None:
    logits = np.array(values, np.float32)
    w, n = len(logits), len(logits) + extra
    order = model_order(logits, n)
    assert sorted(order.tolist()) == list(range(n))  # a permutation
    assert order[w:].tolist() == list(range(w, n))  # tail passthrough
    head = order[:w]
    for a, b in zip(head[:-1], head[1:]):  # descending by logit, ties by upstream index
        assert logits[a] > logits[b] or (logits[a] == logits[b] and a < b)


# The final order the evaluation scores (these tests moved here from test_evaluate.py with the rule).


def test_model_order_sorts_window_desc_ties_by_index_then_tail() -> None:
    order = model_order(np.array([0.1, 0.5, 0.5, -1.0]), 7)
    assert order.tolist() == [1, 2, 0, 3, 4, 5, 6]


def test_model_order_all_ties_and_no_tail() -> None:
    assert model_order(np.zeros(4), 4).tolist() == [0, 1, 2, 3]
    assert model_order(np.array([3.0, 2.0, 1.0]), 3).tolist() == [0, 1, 2]
    assert model_order(np.array([1.0, 2.0, 3.0]), 5).tolist() == [2, 1, 0, 3, 4]


def test_model_order_is_a_permutation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        m = int(rng.integers(1, n + 1))
        order = model_order(rng.integers(0, 3, m).astype(float), n)
        assert sorted(order.tolist()) == list(range(n))
        assert order[m:].tolist() == list(range(m, n))
