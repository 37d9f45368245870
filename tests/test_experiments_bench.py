"""bench/experiments_bench.py: its simulation phases on a hand-made pool (Ray-free, fast), and the
whole `--quick` recipe end to end (integration: it trains two bundles with train_job.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import experiments_bench as eb  # noqa: E402


def toy_pool(n_queries: int = 200, n: int = 15, seed: int = 0) -> eb.Pool:
    """Strong ranks by the hidden label (the oracle), weak keeps a random order: a known, large gap."""
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, 5, n).astype(float) for _ in range(n_queries)]
    orders = {
        "strong": [np.argsort(-y, kind="stable") for y in labels],
        "weak": [rng.permutation(n) for _ in labels],
    }
    shown = {k: np.stack([y[o[: eb.SHOWN]] for y, o in zip(labels, v)]) for k, v in orders.items()}
    return eb.Pool(labels, orders, shown)


def tiny_settings() -> eb.Settings:
    st = eb.Settings.make(quick=True, seed=0)
    return dataclasses.replace(st, aa_runs=12, aa_units=600, sens_runs=4, ab_max_units=4000, il_max_units=1000)


def test_simulation_phases_on_a_toy_pool():
    pool, st = toy_pool(), tiny_settings()
    taus, tau_report = eb.pilot_taus(pool, st)
    assert set(taus) == {"aa", "ab", "il"} and all(v > 0 for v in taus.values())
    assert tau_report["tau"] == taus
    aa = eb.phase_aa(pool, st, taus)
    assert aa["runs"] == 12 and aa["looks_per_run"] == 6
    # An mSPRT rejection at a look needs |z| > sqrt(2 ln 20) > 1.96 there, so the peeking z-test rejects too;
    # and rejecting at the last look is rejecting at some look.
    assert aa["msprt"]["rejections"] <= aa["z_peeking"]["rejections"]
    assert aa["z_final"]["rejections"] <= aa["z_peeking"]["rejections"]
    sens = eb.phase_sensitivity(pool, st, taus)
    # The oracle against a random order: both methods detect it in every run, interleaving with fewer units.
    assert sens["ab"]["detected"] == sens["interleaving"]["detected"] == 4
    assert sens["interleaving"]["median_units"] < sens["ab"]["median_units"]
    assert sens["effects"]["clicks_per_query"]["strong"] > sens["effects"]["clicks_per_query"]["weak"]
    json.dumps(eb.jsonable({"aa": aa, "sensitivity": sens}))


def test_first_rejection_needs_the_right_direction():
    ns = np.array([10, 20, 30])
    V = np.full(3, 0.01)
    assert eb.first_rejection(np.array([0.0, 0.5, 0.5]), V, ns, tau=0.1, alpha=0.05) == 20
    assert eb.first_rejection(np.array([0.0, -0.5, -0.5]), V, ns, tau=0.1, alpha=0.05) is None


def test_cumulative_matches_summarize_at_every_look():
    x = np.random.default_rng(1).normal(size=100)
    ns = np.array([5, 50, 100])
    _, mean, var_mean = eb.cumulative(x, ns)
    for i, n in enumerate(ns):
        s = eb.S.summarize(x[:n])
        assert mean[i] == pytest.approx(s.mean) and var_mean[i] == pytest.approx(s.var_of_mean)


def test_cumulative_ratio_matches_ratio_summary_at_every_look():
    rng = np.random.default_rng(2)
    y = rng.poisson(3, 200) + 1.0
    x = rng.binomial(y.astype(int), 0.3).astype(float)
    ns = np.array([10, 100, 200])
    r, var_mean = eb.cumulative_ratio(x, y, ns)
    for i, n in enumerate(ns):
        s = eb.S.ratio_summary(x[:n], y[:n])
        assert r[i] == pytest.approx(s.mean) and var_mean[i] == pytest.approx(s.var_of_mean)


def test_heterogeneous_users_phase_on_a_toy_pool():
    st = dataclasses.replace(tiny_settings(), users_runs=3, users_ab_max_units=4000, users_il_max_units=1000)
    out = eb.phase_users(toy_pool(), st)
    assert out["ab"]["detected"] == out["interleaving"]["detected"] == 3
    assert out["interleaving"]["median_units"] < out["ab"]["median_units"]
    # Every unit issues at least one query, so a detection costs at least as many queries as units.
    assert out["median_queries"]["ab"] >= out["ab"]["median_units"]
    assert out["pilot"]["tau"]["ab"] > 0 and out["pilot"]["d_ab"] > 0


def test_srm_phase_detects_the_drop_at_scale():
    st = dataclasses.replace(tiny_settings(), srm_runs=3, srm_sizes=(200_000,))
    out = eb.phase_srm(st)["by_units"]["200000"]
    assert out["detection_rate"] == 1.0 and out["theoretical_power"] > 0.99


@pytest.mark.integration
def test_quick_run_end_to_end(tmp_path: Path):
    """Trains two tiny bundles with train_job.py (Ray Train local mode), then every phase; < 60 s."""
    out = tmp_path / "experiments.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/experiments_bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [b["name"] for b in r["bundles"]] == ["strong", "weak"]
    assert all(b["train_wall_s"] > 0 for b in r["bundles"])
    assert set(r["offline"]["ndcg@10"]) == {"strong", "weak"}
    assert r["aa"]["runs"] == 40 and "rate" in r["aa"]["msprt"] and "rate" in r["aa"]["z_peeking"]
    assert r["sensitivity"]["ab"]["runs"] == r["sensitivity"]["interleaving"]["runs"] == 8
    assert "20000" in r["srm"]["by_units"]
    assert r["sensitivity_users"]["runs"] == 4
    assert "sensitivity" in proc.stdout and "A/A" in proc.stdout
