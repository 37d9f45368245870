"""Final ordering of a candidate list: pure functions, no I/O.

Rules (the HTTP contract):
- the Top-M window (the first `window` candidates in upstream order) is sorted by the raw model
  logit, descending; equal logits keep upstream order (ties broken by the lower upstream index);
- the tail (upstream positions >= window) follows, in upstream order;
- the control arm without a model, and every fallback, is the upstream order itself;
- `top_n` truncates the final order, never the scoring.

Orders are arrays of upstream indices (`order[rank] = index`). This module is the one definition of
the ordering rule: `cotrr_ray.core.metrics` ranks by `descending_order`, and offline evaluation
(`cotrr_ray.training.evaluate`) scores the `model_order` that serving returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices by score descending; equal scores keep the lower index first (a stable sort)."""
    # A stable sort of the negated scores keeps equal scores in index (upstream) order.
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def upstream_order(n: int) -> np.ndarray:
    """The upstream order of `n` candidates: 0, 1, ..., n-1."""
    return np.arange(n)


def model_order(logits: np.ndarray, n: int) -> np.ndarray:
    """Window sorted by logit descending (ties by upstream index), then the tail in upstream order.

    `logits` holds one finite value per window candidate, so the window is ``len(logits)``.
    """
    window = len(logits)
    if window > n:
        raise ValueError(f"{window} logits for a list of {n} candidates")
    return np.concatenate([descending_order(logits), np.arange(window, n)])


def order_scores(order: np.ndarray) -> np.ndarray:
    """Scores whose `descending_order` is `order` (rank r gets -r): a final order as metric input."""
    s = np.empty(len(order))
    s[order] = -np.arange(len(order), dtype=np.float64)
    return s


def build_results(
    ids: list[str],
    order: np.ndarray,
    *,
    window: int,
    logits: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    top_n: int | None = None,
) -> list[dict[str, Any]]:
    """Response items in final order: id, upstream index, rank, score, probability, reranked.

    `score` (raw logit) and `probability` are set only for candidates the model reranked (inside
    the window, when `logits` is given); `probability` also needs `probabilities`.
    """
    take = order if top_n is None else order[:top_n]
    scores = None if logits is None else np.asarray(logits, dtype=np.float64).tolist()
    probs = None if probabilities is None or logits is None else np.asarray(probabilities, dtype=np.float64).tolist()
    out = []
    for rank, idx in enumerate(take.tolist()):
        reranked = scores is not None and idx < window
        out.append(
            {
                "id": ids[idx],
                "index": idx,
                "rank": rank,
                "score": scores[idx] if reranked else None,  # type: ignore[index]
                "probability": probs[idx] if reranked and probs is not None else None,
                "reranked": reranked,
            }
        )
    return out


def agreement(ids: list[str], order_a: np.ndarray, order_b: np.ndarray, window: int, k: int = 10) -> dict[str, float]:
    """Kendall tau over the window and overlap@k over the full order, between two final orders.

    Both orders share the tail (upstream order), so tau is computed on the window only, where
    the two arms can differ; overlap@k is taken on what a user sees first.
    """
    # Imported here: cotrr_ray.core.metrics ranks by `descending_order` from this module.
    from cotrr_ray.core.metrics import kendall_tau, overlap_at_k

    a = [ids[i] for i in order_a.tolist()]
    b = [ids[i] for i in order_b.tolist()]
    return {"kendall_tau": kendall_tau(a[:window], b[:window]), f"overlap_at_{k}": overlap_at_k(a, b, k)}
