"""Experiment statistics, each checked against an independent computation (integration, simulation,
hand formulas, exact sums) rather than against itself."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from cotrr_ray.experiments import stats as S


def arm(values: np.ndarray) -> S.ArmSummary:
    return S.summarize(values)


# ============================================================================ SRM


def test_srm_matches_a_hand_computed_chi_square():
    obs, w = {"treatment": 4850, "control": 5150}, {"treatment": 0.5, "control": 0.5}
    r = S.srm_check(obs, w)
    chi2 = (4850 - 5000) ** 2 / 5000 + (5150 - 5000) ** 2 / 5000  # = 9.0
    assert r.chi2 == pytest.approx(chi2)
    # df 1: the chi-square survival function is erfc(sqrt(chi2 / 2)).
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(chi2 / 2)))
    assert not r.mismatch  # p = 0.0027 > 0.001
    assert S.srm_check(obs, w, alpha=0.01).mismatch


def test_srm_with_unequal_weights_and_three_arms():
    obs = {"a": 2000, "b": 3000, "c": 5200}
    w = {"a": 0.2, "b": 0.3, "c": 0.5}
    r = S.srm_check(obs, w)
    n = 10200
    chi2 = sum((obs[k] - n * w[k]) ** 2 / (n * w[k]) for k in obs)
    assert r.chi2 == pytest.approx(chi2) and r.df == 2
    assert r.p_value == pytest.approx(math.exp(-chi2 / 2))  # df 2: the chi-square sf is exp(-x/2)


def test_srm_from_exposures_counts_distinct_units_and_flags_multi_arm_units():
    rows = [("u1", "treatment")] * 5 + [("u2", "control"), ("u3", "control"), ("u4", "treatment"), ("u4", "control")]
    r = S.srm_from_exposures(rows, {"treatment": 0.5, "control": 0.5})
    assert r.observed == {"treatment": 1, "control": 2}  # u1's five requests are one unit; u4 is set apart
    assert r.units_in_multiple_arms == 1 and r.flagged and not r.mismatch
    with pytest.raises(ValueError):
        S.srm_from_exposures([("u", "nope")], {"treatment": 0.5, "control": 0.5})


def test_srm_detects_a_three_percent_drop_at_scale_and_is_quiet_without_it():
    rng = np.random.default_rng(0)
    w = {"treatment": 0.5, "control": 0.5}
    t = rng.binomial(200_000, 0.5)
    kept = rng.binomial(t, 0.97)
    assert S.srm_check({"treatment": kept, "control": 200_000 - t}, w).mismatch
    assert not S.srm_check({"treatment": t, "control": 200_000 - t}, w).p_value < 1e-6


# ============================================================================ mSPRT


def lambda_by_integration(dhat: float, V: float, tau: float, lo: float = -np.inf, hi: float = np.inf) -> float:
    """The mixture likelihood ratio by quadrature: int N(dhat; d, V) / N(dhat; 0, V) prior(d) dd, with the
    N(0, tau^2) prior restricted to [lo, hi] and renormalised (a half-normal prior for one side)."""

    def integrand(d: float) -> float:
        return math.exp((2 * d * dhat - d * d) / (2 * V)) * stats.norm.pdf(d, 0, tau)

    centre = tau * tau * dhat / (V + tau * tau)  # where the integrand peaks (the posterior mean)
    width = 40 * math.sqrt(V * tau * tau / (V + tau * tau))  # beyond this the integrand is ~0
    a, b = max(lo, centre - width), min(hi, centre + width)
    mass = stats.norm.cdf(hi, 0, tau) - stats.norm.cdf(lo, 0, tau)
    return integrate.quad(integrand, a, b, points=[centre] if a < centre < b else None, limit=200)[0] / mass


@pytest.mark.parametrize(
    ("dhat", "V", "tau"), [(0.0, 0.01, 0.1), (0.15, 0.004, 0.05), (-0.3, 0.02, 0.2), (0.02, 1e-4, 0.01)]
)
def test_msprt_lambda_equals_the_numerically_integrated_mixture(dhat, V, tau):
    two = lambda_by_integration(dhat, V, tau)
    assert math.exp(S.msprt_log_lambda(dhat, V, tau)) == pytest.approx(two, rel=1e-6)
    less = lambda_by_integration(dhat, V, tau, hi=0.0)
    greater = lambda_by_integration(dhat, V, tau, lo=0.0)
    assert math.exp(S.msprt_log_lambda(dhat, V, tau, "less")) == pytest.approx(less, rel=1e-6)
    assert math.exp(S.msprt_log_lambda(dhat, V, tau, "greater")) == pytest.approx(greater, rel=1e-6)
    # The two halves of the prior average to the whole.
    assert (less + greater) / 2 == pytest.approx(two, rel=1e-6)


def test_confidence_sequence_is_exactly_the_set_of_effects_not_rejected():
    dhat, V, tau, alpha = 0.12, 0.0016, 0.05, 0.05
    control = S.ArmSummary(1000, 0.0, V / 2)
    treatment = S.ArmSummary(1000, dhat, V / 2)
    for alt in ("two-sided", "less", "greater"):
        r = S.msprt(control, treatment, tau=tau, alpha=alpha, alternative=alt)
        grid = np.linspace(dhat - 0.5, dhat + 0.5, 4001)
        not_rejected = S.msprt_log_lambda(dhat - grid, V, tau, alt) < math.log(1 / alpha)
        inside = (grid >= r.ci_low) & (grid <= r.ci_high)
        step = grid[1] - grid[0]
        edge = np.minimum(np.abs(grid - r.ci_low), np.abs(grid - r.ci_high)) < step
        assert np.array_equal(not_rejected[~edge], inside[~edge]), alt


def test_msprt_reject_and_always_valid_p_value():
    rng = np.random.default_rng(0)
    a, b = arm(rng.normal(0, 1, 2000)), arm(rng.normal(0.3, 1, 2000))
    r = S.msprt(a, b, tau=0.1)
    assert r.dhat == pytest.approx(b.mean - a.mean) and r.V == pytest.approx(a.var_of_mean + b.var_of_mean)
    assert r.reject and r.p_value_look == pytest.approx(math.exp(-r.log_lambda)) and r.ci_low > 0
    assert not S.msprt(a, b, tau=0.1, alternative="less").reject  # treatment is better: no harm
    # The always-valid p-value is the running minimum: a weaker later look cannot raise it.
    later = S.msprt(a, S.ArmSummary(b.n, a.mean, b.var_of_mean), tau=0.1, previous_p=r.p_value)
    assert later.p_value_look == 1.0 and later.p_value == r.p_value
    json.dumps(dataclasses.asdict(r))


def _aa_false_positive_rates(n_sims: int, looks: int, batch: int, seed: int) -> tuple[float, float]:
    """P(ever reject) under H0 for the mSPRT and for a fixed-horizon z-test re-run after every batch."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n_sims, 2, looks * batch))
    n = batch * np.arange(1, looks + 1)
    csum = np.cumsum(x, axis=2)[:, :, n - 1]
    csq = np.cumsum(x * x, axis=2)[:, :, n - 1]
    mean = csum / n
    var_mean = (csq - n * mean * mean) / (n - 1) / n
    dhat, V = mean[:, 1] - mean[:, 0], var_mean.sum(axis=1)
    msprt_any = (S.msprt_log_lambda(dhat, V, tau=0.1) >= math.log(20)).any(axis=1)
    z_any = (np.abs(dhat / np.sqrt(V)) > stats.norm.ppf(0.975)).any(axis=1)
    return float(msprt_any.mean()), float(z_any.mean())


def test_msprt_controls_false_positives_under_continuous_peeking_while_the_z_test_does_not():
    fpr_msprt, fpr_z = _aa_false_positive_rates(n_sims=1000, looks=50, batch=40, seed=1)
    # 1000 simulations: a binomial SE of ~0.007 at 0.05. The mSPRT is conservative (well under alpha);
    # the peeking z-test, checked 50 times, is far above it (about 0.25-0.3 in theory).
    assert fpr_msprt <= 0.05
    assert fpr_z > 0.15


def test_sequential_test_keeps_the_running_minimum_and_intersects_the_sequence():
    rng = np.random.default_rng(2)
    seq = S.SequentialTest(tau=0.2, alpha=0.05)
    xa, xb = rng.normal(0, 1, 3000), rng.normal(0.25, 1, 3000)
    ps, widths = [], []
    for n in range(100, 3001, 100):
        seq.update(arm(xa[:n]), arm(xb[:n]))
        ps.append(seq.p_value)
        widths.append(seq.ci_high - seq.ci_low)
    assert all(p2 <= p1 for p1, p2 in zip(ps, ps[1:])) and all(w2 <= w1 for w1, w2 in zip(widths, widths[1:]))
    assert seq.rejected and seq.looks == 30 and seq.ci_low > 0
    assert all(h.ci_low <= seq.ci_low and seq.ci_high <= h.ci_high for h in seq.history)
    assert seq.ci_low == max(h.ci_low for h in seq.history)


def test_default_tau_and_guardrail_alpha():
    assert S.default_tau(0.02) == 0.02
    assert S.default_tau(sd=3.0) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        S.default_tau()
    k, alpha = 4, 0.05
    a_k = S.guardrail_alpha(alpha, k)
    assert 1 - (1 - a_k) ** k == pytest.approx(alpha)


# ============================================================================ delta method


def _units(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit impressions and clicks with a per-user CTR: clicks of one user are correlated."""
    impressions = rng.poisson(3, n) + 1
    ctr = rng.beta(2, 8, n)
    return rng.binomial(impressions, ctr).astype(float), impressions.astype(float)


def test_delta_method_variance_matches_monte_carlo():
    rng = np.random.default_rng(3)
    n, sims = 400, 4000
    ratios = np.empty(sims)
    for i in range(sims):
        clicks, imps = _units(rng, n)
        ratios[i] = clicks.sum() / imps.sum()
    clicks, imps = _units(rng, n)
    r = S.ratio_summary(clicks, imps)
    assert r.kind == "ratio" and r.mean == pytest.approx(clicks.sum() / imps.sum())
    # The Monte Carlo variance of R over independent experiments is the truth; SE of a variance
    # estimate from 4000 draws is ~2.2%, plus the one-sample noise of the delta estimate itself.
    assert r.var_of_mean == pytest.approx(ratios.var(ddof=1), rel=0.15)
    # The naive binomial variance on pooled counts ignores the per-user correlation: clearly smaller.
    naive = r.mean * (1 - r.mean) / imps.sum()
    assert naive < 0.8 * ratios.var(ddof=1)


def test_delta_method_agrees_with_a_large_bootstrap_over_units():
    rng = np.random.default_rng(4)
    clicks, imps = _units(rng, 2000)
    idx = rng.integers(0, 2000, (3000, 2000))
    boot = clicks[idx].sum(axis=1) / imps[idx].sum(axis=1)
    assert S.ratio_summary(clicks, imps).var_of_mean == pytest.approx(boot.var(ddof=1), rel=0.08)


def test_ratio_with_constant_denominator_is_the_plain_mean():
    rng = np.random.default_rng(5)
    x = rng.normal(2, 1, 500)
    r, m = S.ratio_summary(x * 4, np.full(500, 4.0)), S.summarize(x)
    assert r.mean == pytest.approx(m.mean) and r.var_of_mean == pytest.approx(m.var_of_mean)


# ============================================================================ fixed horizon


def test_welch_matches_scipy_ttest_and_z_matches_the_normal():
    rng = np.random.default_rng(6)
    xa, xb = rng.normal(0, 1, 300), rng.normal(0.2, 2, 500)
    r = S.fixed_horizon_test(arm(xa), arm(xb), method="welch")
    ref = stats.ttest_ind(xb, xa, equal_var=False)
    assert r.statistic == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high))
    for alt in ("less", "greater"):
        assert S.fixed_horizon_test(arm(xa), arm(xb), alternative=alt).p_value == pytest.approx(
            stats.ttest_ind(xb, xa, equal_var=False, alternative=alt).pvalue
        )
    z = S.fixed_horizon_test(arm(xa), arm(xb), method="z")
    se = math.sqrt(xa.var(ddof=1) / 300 + xb.var(ddof=1) / 500)
    d = xb.mean() - xa.mean()
    assert z.p_value == pytest.approx(math.erfc(abs(d / se) / math.sqrt(2)))
    assert z.ci_high - z.ci_low == pytest.approx(2 * 1.959963984540054 * se)


def test_ratio_metric_enters_the_tests_through_its_delta_variance():
    rng = np.random.default_rng(7)
    ca, ia = _units(rng, 3000)
    cb, ib = _units(rng, 3000)
    a, b = S.ratio_summary(ca, ia), S.ratio_summary(cb, ib)
    z = S.fixed_horizon_test(a, b, method="z")
    assert z.se == pytest.approx(math.sqrt(a.var_of_mean + b.var_of_mean))
    assert S.msprt(a, b, tau=0.01).V == pytest.approx(z.se**2)


# ============================================================================ interleaving


def test_interleaving_counts_delta_and_sign_test_against_exact_binomial_sums():
    ht = np.array([2, 1, 0, 0, 1, 3, 0, 1, 1, 0, 2, 1])
    hc = np.array([0, 0, 1, 0, 1, 0, 0, 0, 2, 0, 0, 0])
    r = S.interleaving_analysis(ht, hc)
    w_t, w_c, t = 6, 2, 4  # pairs (h_T, h_C) counted by hand
    assert (r.wins_treatment, r.wins_control, r.ties) == (w_t, w_c, t)
    assert r.delta == pytest.approx((w_t + t / 2) / (w_t + w_c + t) - 0.5)
    n = w_t + w_c
    # Two-sided exact binomial p-value: the probability of outcomes at most as likely as the observed.
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    exact = sum(p for p in pmf if p <= pmf[w_t] * (1 + 1e-12))
    assert r.p_value == pytest.approx(exact)
    assert r.units == 12 and r.unit_p_value == pytest.approx(exact)  # no unit ids: every query a unit


def test_interleaving_collapses_to_one_vote_per_unit():
    ht = [1, 1, 1, 0, 0, 2]
    hc = [0, 0, 0, 1, 3, 0]
    units = ["u1", "u1", "u1", "u2", "u2", "u3"]
    r = S.interleaving_analysis(ht, hc, units, competitive_only=True)
    # u1: +3, u2: -4, u3: +2 -> two treatment votes, one control vote, no tie.
    assert (r.unit_wins_treatment, r.unit_wins_control, r.unit_ties) == (2, 1, 0)
    assert (r.wins_treatment, r.wins_control) == (4, 2)
    assert r.unit_p_value == pytest.approx(1.0) and r.unit_delta == pytest.approx(2 / 3 - 0.5)
    json.dumps(dataclasses.asdict(r))


def test_interleaving_sign_test_rejects_only_with_a_real_preference():
    rng = np.random.default_rng(8)
    ht, hc = rng.binomial(1, 0.30, 3000), rng.binomial(1, 0.30, 3000)
    assert S.interleaving_analysis(ht, hc).p_value > 1e-3
    ht = rng.binomial(1, 0.36, 3000)
    assert S.interleaving_analysis(ht, hc).p_value < 1e-3
