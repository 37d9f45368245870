"""A seeded click simulator: which shown positions a user clicks, given the hidden relevance labels.

Offline studies of the experiment statistics (bench/experiments_bench.py) and the HTTP end-to-end
need clicks whose dependence on ranking quality is known. Two classic models (Chuklin, Markov,
de Rijke, "Click Models for Web Search", 2015), both numpy in, numpy out:

* position-based (PBM): position p (0-based) is examined with probability ``1 / (1 + p)**eta``,
  independently of the rest; an examined item is clicked with its attractiveness. Clicks at two
  positions are independent given the labels.
* cascade (Craswell et al. 2008, with a continuation probability like the DCM): the user reads top
  down; each examined item is clicked with its attractiveness; after a click they stop with
  probability ``stop_after_click``, and after a skip they go on with probability ``continue_after_skip``
  (1.0 is the original cascade model).

Attractiveness rises with the graded label (0..max_label) like the gain of nDCG (Chapelle et al.,
the DBN paper): ``noise + (1 - noise) * (2**label - 1) / (2**max_label - 1)``, so a label-0 item is
still clicked now and then (``noise``), as real users misclick and explore.

Labels are given in *displayed* order; NaN marks an empty slot (a shorter list in a padded batch),
which is never examined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "ClickModel",
    "attractiveness",
    "examination",
    "simulate_clicks",
    "simulate_clicks_batch",
]


@dataclass(frozen=True)
class ClickModel:
    """The click model's parameters; the defaults are a mild position bias and 5% noise clicks."""

    kind: Literal["position", "cascade"] = "position"
    eta: float = 1.0  # PBM: examination 1 / (1 + p)**eta; 0 = no position bias
    noise: float = 0.05  # attractiveness of a label-0 item
    max_label: int = 4  # labels are 0..max_label (the synthetic generator's grades)
    stop_after_click: float = 1.0  # cascade: P(stop | clicked)
    continue_after_skip: float = 1.0  # cascade: P(go on | examined, not clicked)

    def __post_init__(self) -> None:
        if self.kind not in ("position", "cascade"):
            raise ValueError(f"kind must be 'position' or 'cascade', got {self.kind!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        for name in ("noise", "stop_after_click", "continue_after_skip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_label < 1:
            raise ValueError(f"max_label must be >= 1, got {self.max_label}")


def examination(n: int, eta: float = 1.0) -> np.ndarray:
    """PBM examination probabilities of positions 0..n-1: ``1 / (1 + p)**eta`` (position 0 always)."""
    return 1.0 / (1.0 + np.arange(n, dtype=np.float64)) ** eta


def attractiveness(labels: np.ndarray, model: ClickModel = ClickModel()) -> np.ndarray:
    """P(click | examined) per label; NaN labels (empty slots) map to 0."""
    y = np.asarray(labels, dtype=np.float64)
    finite = np.isfinite(y)
    if np.any((y[finite] < 0) | (y[finite] > model.max_label)):
        raise ValueError(f"labels must be in [0, {model.max_label}]")
    gain = (np.exp2(np.where(finite, y, 0.0)) - 1.0) / (2.0**model.max_label - 1.0)
    return np.where(finite, model.noise + (1.0 - model.noise) * gain, 0.0)


def simulate_clicks_batch(
    labels: np.ndarray,
    rng: np.random.Generator,
    model: ClickModel = ClickModel(),
    propensity: np.ndarray | None = None,
) -> np.ndarray:
    """(Q, n) labels in displayed order -> (Q, n) bool clicks, one simulated user per row.

    ``propensity`` (Q,) scales each row's attractiveness (clipped at 1): users differ in how readily
    they click, which is the between-user variance an A/B metric has to fight and a within-user
    comparison (interleaving) largely cancels. None: every user the same (1.0).
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"labels must be (queries, positions), got shape {y.shape}")
    attract = attractiveness(y, model)
    if propensity is not None:
        c = np.asarray(propensity, dtype=np.float64)
        if c.shape != (y.shape[0],) or np.any(c < 0):
            raise ValueError(f"propensity must be (queries,) and non-negative, got shape {c.shape}")
        attract = np.minimum(attract * c[:, None], 1.0)
    clicked = rng.random(y.shape) < attract
    if model.kind == "position":
        examined = rng.random(y.shape) < examination(y.shape[1], model.eta)
        return clicked & examined
    return _cascade(clicked, rng, model)


def _cascade(would_click: np.ndarray, rng: np.random.Generator, model: ClickModel) -> np.ndarray:
    """Walk the positions top down: a row stays active until the user stops (vectorised over rows)."""
    active = np.ones(would_click.shape[0], dtype=bool)
    out = np.zeros_like(would_click)
    for p in range(would_click.shape[1]):
        out[:, p] = active & would_click[:, p]
        go_on = np.where(
            out[:, p],
            rng.random(active.shape) >= model.stop_after_click,
            rng.random(active.shape) < model.continue_after_skip,
        )
        active &= go_on
    return out


def simulate_clicks(labels: np.ndarray, rng: np.random.Generator, model: ClickModel = ClickModel()) -> np.ndarray:
    """One list's labels in displayed order -> the clicked positions (sorted 0-based int array)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return np.flatnonzero(simulate_clicks_batch(y[None, :], rng, model)[0])
