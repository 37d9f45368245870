"""The click simulator: its probabilities, and that clicks follow labels and fall with position."""

from __future__ import annotations

import numpy as np
import pytest

from cotrr_ray.experiments.simulator import (
    ClickModel,
    attractiveness,
    examination,
    simulate_clicks,
    simulate_clicks_batch,
)


def test_examination_and_attractiveness_formulas():
    np.testing.assert_allclose(examination(4, eta=1.0), [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(examination(3, eta=0.0), [1, 1, 1])
    m = ClickModel(noise=0.1, max_label=4)
    np.testing.assert_allclose(attractiveness(np.array([0, 1, 4, np.nan]), m), [0.1, 0.1 + 0.9 / 15, 1.0, 0.0])
    with pytest.raises(ValueError):
        attractiveness(np.array([5.0]), m)


def test_pbm_click_rates_match_examination_times_attractiveness():
    model = ClickModel(kind="position", eta=1.0, noise=0.05)
    labels = np.tile(np.array([4, 2, 0, 3, 1], dtype=float), (40_000, 1))
    rates = simulate_clicks_batch(labels, np.random.default_rng(0), model).mean(axis=0)
    expected = examination(5, 1.0) * attractiveness(labels[0], model)
    np.testing.assert_allclose(rates, expected, atol=0.01)


def test_higher_label_more_clicks_and_lower_positions_fewer():
    rng = np.random.default_rng(1)
    for kind in ("position", "cascade"):
        model = ClickModel(kind=kind, stop_after_click=0.5)
        by_label = [simulate_clicks_batch(np.full((20_000, 1), lab), rng, model).mean() for lab in range(5)]
        assert all(x < y for x, y in zip(by_label, by_label[1:])), (kind, by_label)
        same = simulate_clicks_batch(np.full((20_000, 8), 2.0), rng, model).mean(axis=0)
        assert all(x > y for x, y in zip(same, same[1:])), (kind, same)


def test_better_ordering_gets_more_clicks():
    labels = np.array([4, 3, 2, 1, 0, 0, 0, 0], dtype=float)
    rng = np.random.default_rng(2)
    good = simulate_clicks_batch(np.tile(labels, (20_000, 1)), rng).sum(axis=1).mean()
    bad = simulate_clicks_batch(np.tile(labels[::-1], (20_000, 1)), rng).sum(axis=1).mean()
    assert good > bad + 0.3


def test_cascade_stops_after_a_click():
    rng = np.random.default_rng(3)
    clicks = simulate_clicks_batch(np.full((5000, 6), 4.0), rng, ClickModel(kind="cascade", stop_after_click=1.0))
    # Attractiveness 1 at the top and certain stop: exactly one click, at position 0.
    assert np.all(clicks[:, 0]) and not np.any(clicks[:, 1:])
    dcm = simulate_clicks_batch(np.full((20_000, 6), 2.0), rng, ClickModel(kind="cascade", stop_after_click=0.0))
    p = attractiveness(np.array([2.0]))[0]
    np.testing.assert_allclose(dcm.mean(axis=0), p, atol=0.015)  # never stops: every position examined


def test_cascade_continue_after_skip_matches_its_geometric_law():
    model = ClickModel(kind="cascade", continue_after_skip=0.5, noise=0.0)
    clicks = simulate_clicks_batch(np.zeros((20_000, 4)), np.random.default_rng(4), model)
    assert not clicks.any()  # label 0 with no noise: nothing is attractive
    model = ClickModel(kind="cascade", continue_after_skip=0.5, noise=0.2, stop_after_click=1.0)
    clicks = simulate_clicks_batch(np.zeros((40_000, 3)), np.random.default_rng(5), model)
    # P(click at p) = (P(no click, continue))^p * 0.2, with P(no click, continue) = 0.8 * 0.5.
    np.testing.assert_allclose(clicks.mean(axis=0), [0.2, 0.2 * 0.4, 0.2 * 0.16], atol=0.01)


def test_seeded_and_nan_slots_never_clicked():
    labels = np.array([3, np.nan, 4, np.nan], dtype=float)
    a = [simulate_clicks(labels, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    many = simulate_clicks_batch(np.tile(labels, (5000, 1)), np.random.default_rng(8))
    assert not many[:, [1, 3]].any() and many[:, [0, 2]].any()
    with pytest.raises(ValueError):
        ClickModel(kind="dbn")


def test_propensity_scales_each_users_click_rate():
    labels = np.tile(np.array([2.0, 1.0, 3.0]), (30_000, 1))
    c = np.repeat([0.0, 0.5, 2.0], 10_000)
    clicks = simulate_clicks_batch(labels, np.random.default_rng(9), ClickModel(eta=0.0), propensity=c)
    base = attractiveness(labels[0])
    for i, scale in enumerate([0.0, 0.5, 2.0]):
        rows = clicks[i * 10_000 : (i + 1) * 10_000]
        np.testing.assert_allclose(rows.mean(axis=0), np.minimum(base * scale, 1.0), atol=0.015)
    with pytest.raises(ValueError):
        simulate_clicks_batch(labels[:2], np.random.default_rng(0), propensity=np.array([1.0, -1.0]))
