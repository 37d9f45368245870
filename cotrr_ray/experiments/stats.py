"""Experiment statistics on per-unit aggregates: SRM, mSPRT, the delta method, fixed-horizon tests,
interleaving preference. Each function's docstring gives its formula and source.

Why per unit: the randomisation unit (a user) is what is independent. A user's queries share their
taste, so treating queries as independent samples understates the variance and inflates false
positives. Every test here therefore takes one row per unit: a value (clicks per unit), or a
numerator and a denominator whose ratio of sums is the metric (CTR = clicks / impressions), handled by
the delta method so that the same tests apply.

Sign convention: every difference is ``treatment - control``; results are plain dataclasses
(``dataclasses.asdict`` gives JSON-able dicts).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

__all__ = [
    "Alternative",
    "ArmSummary",
    "FixedHorizonResult",
    "InterleavingResult",
    "MSPRTResult",
    "SRMResult",
    "SequentialTest",
    "default_tau",
    "fixed_horizon_test",
    "guardrail_alpha",
    "interleaving_analysis",
    "msprt",
    "msprt_log_lambda",
    "msprt_paired",
    "ratio_summary",
    "srm_check",
    "srm_from_exposures",
    "summarize",
]

Alternative = Literal["two-sided", "less", "greater"]


# ============================================================================ per-arm summaries


@dataclass(frozen=True)
class ArmSummary:
    """One arm's metric over its units: n units, the metric's estimate, and the variance of that estimate.

    ``var_of_mean`` is what every test needs (V = var_A/n_A + var_B/n_B in experiments.md is the sum of
    the two arms' ``var_of_mean``); ``variance`` is the per-unit equivalent ``n * var_of_mean``, so a
    plain mean and a delta-method ratio enter the tests the same way.
    """

    n: int
    mean: float
    var_of_mean: float
    kind: Literal["mean", "ratio"] = "mean"

    @property
    def variance(self) -> float:
        return self.n * self.var_of_mean


def summarize(values: ArrayLike) -> ArmSummary:
    """Per-unit values (one per unit) -> mean and the variance of the mean (sample variance, ddof 1)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 units, got shape {x.shape}")
    return ArmSummary(int(x.size), float(x.mean()), float(x.var(ddof=1) / x.size))


def ratio_summary(numerators: ArrayLike, denominators: ArrayLike) -> ArmSummary:
    """Ratio metric ``R = sum(x) / sum(y)`` over units, with its delta-method variance.

    Why not the mean of per-unit ratios: that weights a user with one impression like one with a
    thousand. Why not a binomial variance on the pooled counts: clicks of one user are correlated.
    The first-order Taylor expansion of ``xbar / ybar`` around the means gives (Deng et al. 2018)

        Var(R) ~= (s_x^2 - 2 R s_xy + R^2 s_y^2) / (n * ybar^2)

    with sample (co)variances over units.
    """
    x, y = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(
            f"numerators and denominators must be equal-length 1-D arrays of >= 2 units: {x.shape}, {y.shape}"
        )
    ybar = y.mean()
    if ybar <= 0:
        raise ValueError("the denominators' mean must be positive")
    r = x.mean() / ybar
    cov = np.cov(x, y, ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (x.size * ybar * ybar)
    return ArmSummary(int(x.size), float(r), float(max(var, 0.0)), kind="ratio")


# ============================================================================ sample ratio mismatch


@dataclass(frozen=True)
class SRMResult:
    """Chi-square of distinct exposed units per arm against the configured weights."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    df: int
    p_value: float
    alpha: float
    mismatch: bool  # p_value < alpha
    units_in_multiple_arms: int  # excluded from `observed`; any is a bug in assignment or logging
    flagged: bool  # mismatch, or any unit seen in more than one arm


def srm_check(
    observed: Mapping[str, int],
    weights: Mapping[str, float],
    *,
    alpha: float = 0.001,
    units_in_multiple_arms: int = 0,
) -> SRMResult:
    """chi^2 = sum_k (O_k - N w_k)^2 / (N w_k), df = K - 1 (`scipy.stats.chisquare`).

    The default alpha 0.001 is GrowthBook's: an SRM check runs on every experiment, so its false
    alarms must be rare, and the imbalances worth catching (a dropped log, a crashing arm) are large.
    """
    arms = sorted(weights)
    if set(observed) - set(arms):
        raise ValueError(f"observed arms {sorted(set(observed) - set(arms))} have no weight")
    w = np.array([weights[a] for a in arms], dtype=np.float64)
    if len(arms) < 2 or np.any(w <= 0):
        raise ValueError("need at least two arms with positive weights")
    o = np.array([observed.get(a, 0) for a in arms], dtype=np.float64)
    total = o.sum()
    if total <= 0:
        raise ValueError("no exposed units")
    exp = total * w / w.sum()
    chi2, p = stats.chisquare(o, exp)
    mismatch = bool(p < alpha)
    return SRMResult(
        observed={a: int(v) for a, v in zip(arms, o)},
        expected={a: float(v) for a, v in zip(arms, exp)},
        chi2=float(chi2),
        df=len(arms) - 1,
        p_value=float(p),
        alpha=alpha,
        mismatch=mismatch,
        units_in_multiple_arms=units_in_multiple_arms,
        flagged=mismatch or units_in_multiple_arms > 0,
    )


def srm_from_exposures(
    exposures: Iterable[tuple[Hashable, str]], weights: Mapping[str, float], *, alpha: float = 0.001
) -> SRMResult:
    """SRM over (unit, arm) exposure rows: each unit counted once; units in several arms reported apart.

    Requests are not the unit: a heavy user in one arm would look like a mismatch, and the test's
    independence assumption holds for units only.
    """
    arms_of: dict[Hashable, set[str]] = {}
    for unit, arm in exposures:
        arms_of.setdefault(unit, set()).add(arm)
    counts: dict[str, int] = dict.fromkeys(weights, 0)
    multi = 0
    for arms in arms_of.values():
        if len(arms) > 1:
            multi += 1
        else:
            (arm,) = arms
            if arm not in counts:
                raise ValueError(f"exposure in arm {arm!r}, which has no weight")
            counts[arm] += 1
    return srm_check(counts, weights, alpha=alpha, units_in_multiple_arms=multi)


# ============================================================================ mSPRT


def default_tau(mde: float | None = None, *, sd: float | None = None, standardized_effect: float = 0.1) -> float:
    """The mixture's scale tau, chosen before the experiment (a data-dependent tau voids the guarantee).

    Rule: the smallest effect worth detecting (``mde``, in the metric's units) when there is one;
    otherwise ``standardized_effect`` (default 0.1, a "small" Cohen's d) times the per-unit standard
    deviation ``sd`` from historical or pre-period data. Why: the normal mixture's power is highest for
    effects near tau; a tau far above the effect delays detection of small effects, far below it
    wastes samples on large ones (Johari et al. 2017, section 4).
    """
    if mde is not None:
        if mde <= 0:
            raise ValueError(f"mde must be positive, got {mde}")
        return float(mde)
    if sd is None or sd <= 0:
        raise ValueError("give the smallest effect worth detecting (mde) or a positive historical per-unit sd")
    return float(standardized_effect * sd)


def guardrail_alpha(alpha: float, k: int) -> float:
    """Per-guardrail level for k guardrails with family-wise level alpha (Sidak): 1 - (1 - alpha)^(1/k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 - (1.0 - alpha) ** (1.0 / k)


def msprt_log_lambda(dhat: ArrayLike, V: ArrayLike, tau: float, alternative: Alternative = "two-sided") -> np.ndarray:
    """log Lambda of the normal-mixture SPRT (vectorised; logs, because Lambda overflows for large effects).

    Two-sided, mixture N(0, tau^2) over the effect:
        Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 dhat^2 / (2 V (V + tau^2)))
    One-sided, the half-normal mixture on the alternative's side: the same integral over half the
    line, i.e. the two-sided Lambda times 2 P(effect on that side | dhat) under the mixture's
    posterior N(tau^2 dhat / (V + tau^2), V tau^2 / (V + tau^2)). ``"less"`` (treatment below control)
    is the harm test of a higher-is-better guardrail.
    """
    d, v = np.asarray(dhat, dtype=np.float64), np.asarray(V, dtype=np.float64)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    t2 = tau * tau
    log_two_sided = 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2))
    if alternative == "two-sided":
        return log_two_sided
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    z = tau * d / np.sqrt(v * (v + t2))  # posterior mean / posterior sd
    side = -z if alternative == "less" else z
    return log_two_sided + math.log(2.0) + special.log_ndtr(side)


@dataclass(frozen=True)
class MSPRTResult:
    """One look of the mSPRT. ``p_value`` is always valid only as the running minimum over looks
    (`SequentialTest` keeps it); ``p_value_look`` = min(1, 1/Lambda) of this look alone."""

    dhat: float
    V: float
    tau: float
    alpha: float
    alternative: str
    log_lambda: float
    p_value_look: float
    p_value: float
    reject: bool
    ci_low: float
    ci_high: float


def _cs_bounds(dhat: float, V: float, tau: float, alpha: float, alternative: Alternative) -> tuple[float, float]:
    """Confidence sequence: every effect d0 the test would not reject, {d0 : Lambda(dhat - d0) < 1/alpha}."""
    t2 = tau * tau
    if alternative == "two-sided":
        half = math.sqrt(V * (V + t2) / t2 * (2 * math.log(1 / alpha) + math.log((V + t2) / V)))
        return dhat - half, dhat + half
    # One-sided: Lambda_less(x) falls as x = dhat - d0 grows, so the set is a half line; its end solves
    # log Lambda_less(x) = log(1/alpha), found by bracketing (no closed form for the half-normal mixture).
    target = math.log(1 / alpha)
    sign = -1.0 if alternative == "less" else 1.0

    def f(x: float) -> float:
        return float(msprt_log_lambda(sign * x, V, tau, alternative)) - target

    hi = math.sqrt(V + t2)
    while f(hi) < 0:
        hi *= 2
    x_star = optimize.brentq(f, 0.0, hi, xtol=1e-12 * hi)
    if alternative == "less":  # rejects "effect >= d0" for d0 above dhat + x_star
        return -math.inf, dhat + x_star
    return dhat - x_star, math.inf


def msprt(
    control: ArmSummary,
    treatment: ArmSummary,
    *,
    tau: float,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
    previous_p: float = 1.0,
) -> MSPRTResult:
    """mSPRT (Johari, Koomen, Pekelis, Walsh, KDD 2017) for ``treatment.mean - control.mean``.

    dhat = mean_T - mean_C, V = var_of_mean_T + var_of_mean_C. Reject when Lambda >= 1/alpha; the
    always-valid p-value is p_t = min(p_{t-1}, 1/Lambda_t) (pass ``previous_p``; `SequentialTest` does).
    Valid under continuous monitoring: checking after every unit keeps P(ever reject | H0) <= alpha.
    """
    dhat = treatment.mean - control.mean
    V = treatment.var_of_mean + control.var_of_mean
    return _msprt_from(dhat, V, tau=tau, alpha=alpha, alternative=alternative, previous_p=previous_p)


def msprt_paired(
    diff: ArmSummary,
    *,
    tau: float,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
    previous_p: float = 1.0,
) -> MSPRTResult:
    """mSPRT on a within-unit difference (e.g. an interleaving preference per unit): dhat = mean, V = var_of_mean."""
    return _msprt_from(
        diff.mean, diff.var_of_mean, tau=tau, alpha=alpha, alternative=alternative, previous_p=previous_p
    )


def _msprt_from(
    dhat: float, V: float, *, tau: float, alpha: float, alternative: Alternative, previous_p: float
) -> MSPRTResult:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not V > 0:
        raise ValueError(f"the variance of the difference must be positive, got {V}")
    log_lam = float(msprt_log_lambda(dhat, V, tau, alternative))
    p_look = float(min(1.0, math.exp(-log_lam)))
    p = min(previous_p, p_look)
    low, high = _cs_bounds(dhat, V, tau, alpha, alternative)
    return MSPRTResult(
        dhat=float(dhat),
        V=float(V),
        tau=float(tau),
        alpha=alpha,
        alternative=alternative,
        log_lambda=log_lam,
        p_value_look=p_look,
        p_value=p,
        reject=bool(p <= alpha),
        ci_low=low,
        ci_high=high,
    )


@dataclass
class SequentialTest:
    """The mSPRT over looks: keeps the running-minimum p-value and the intersected confidence sequence.

    A rejection is final (the always-valid p-value never rises again), which is what lets a dashboard
    show the result after every batch of units and a rollout stop the moment it trips.
    """

    tau: float
    alpha: float = 0.05
    alternative: Alternative = "two-sided"
    p_value: float = 1.0
    ci_low: float = -math.inf
    ci_high: float = math.inf
    looks: int = 0
    history: list[MSPRTResult] = field(default_factory=list)

    def update(self, control: ArmSummary, treatment: ArmSummary) -> MSPRTResult:
        """One look with the arms' cumulative summaries."""
        return self._record(
            msprt(
                control,
                treatment,
                tau=self.tau,
                alpha=self.alpha,
                alternative=self.alternative,
                previous_p=self.p_value,
            )
        )

    def update_paired(self, diff: ArmSummary) -> MSPRTResult:
        """One look with a within-unit difference's cumulative summary."""
        return self._record(
            msprt_paired(diff, tau=self.tau, alpha=self.alpha, alternative=self.alternative, previous_p=self.p_value)
        )

    def _record(self, r: MSPRTResult) -> MSPRTResult:
        self.p_value = r.p_value
        # Every look's sequence covers the effect at all times with probability 1 - alpha, so their
        # intersection does too, and it only ever narrows.
        self.ci_low, self.ci_high = max(self.ci_low, r.ci_low), min(self.ci_high, r.ci_high)
        self.looks += 1
        self.history.append(r)
        return r

    @property
    def rejected(self) -> bool:
        return self.p_value <= self.alpha


# ============================================================================ fixed horizon


@dataclass(frozen=True)
class FixedHorizonResult:
    """A test at one pre-planned sample size: valid once, inflated when re-run after every batch (peeking)."""

    method: str
    dhat: float
    se: float
    statistic: float
    df: float | None  # Welch-Satterthwaite degrees of freedom; None for the z-test
    p_value: float
    alpha: float
    alternative: str
    ci_low: float
    ci_high: float
    reject: bool


def fixed_horizon_test(
    control: ArmSummary,
    treatment: ArmSummary,
    *,
    alpha: float = 0.05,
    method: Literal["welch", "z"] = "welch",
    alternative: Alternative = "two-sided",
) -> FixedHorizonResult:
    """Welch's t (unequal variances) or the normal z-test for ``treatment.mean - control.mean``, with its CI.

    Ratio metrics work through their delta-method ``var_of_mean``; their Welch df uses each arm's unit
    count, which is the first-order approximation (with thousands of units Welch and z agree anyway).
    """
    dhat = treatment.mean - control.mean
    vt, vc = treatment.var_of_mean, control.var_of_mean
    se = math.sqrt(vt + vc)
    if not se > 0:
        raise ValueError("the standard error of the difference must be positive")
    stat = dhat / se
    if method == "welch":
        df = (vt + vc) ** 2 / (vt * vt / (treatment.n - 1) + vc * vc / (control.n - 1))
        dist = stats.t(df)
    elif method == "z":
        df, dist = None, stats.norm()
    else:
        raise ValueError(f"method must be 'welch' or 'z', got {method!r}")
    if alternative == "two-sided":
        p = 2 * dist.sf(abs(stat))
        q = dist.ppf(1 - alpha / 2)
        low, high = dhat - q * se, dhat + q * se
    elif alternative == "less":
        p, q = dist.cdf(stat), dist.ppf(1 - alpha)
        low, high = -math.inf, dhat + q * se
    elif alternative == "greater":
        p, q = dist.sf(stat), dist.ppf(1 - alpha)
        low, high = dhat - q * se, math.inf
    else:
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    return FixedHorizonResult(
        method=method,
        dhat=float(dhat),
        se=se,
        statistic=float(stat),
        df=None if df is None else float(df),
        p_value=float(p),
        alpha=alpha,
        alternative=alternative,
        ci_low=float(low),
        ci_high=float(high),
        reject=bool(p < alpha),
    )


# ============================================================================ interleaving


@dataclass(frozen=True)
class InterleavingResult:
    """Team-draft outcome counts and the sign test, per query and collapsed to one vote per unit.

    ``delta`` = (w_T + t/2) / (w_T + w_C + t) - 1/2: positive when treatment is preferred, in
    [-1/2, 1/2]. The sign test ignores ties: under H0 w_T ~ Binomial(w_T + w_C, 1/2). The per-unit
    figures are the ones to decide on: a user's queries are correlated, so the per-query p-value is
    too small whenever users issue several queries.
    """

    queries: int
    wins_treatment: int
    wins_control: int
    ties: int
    delta: float
    p_value: float
    units: int
    unit_wins_treatment: int
    unit_wins_control: int
    unit_ties: int
    unit_delta: float
    unit_p_value: float
    competitive_only: bool | None = None  # how h_T/h_C were credited, when the caller says


def _delta(w_t: int, w_c: int, t: int) -> float:
    n = w_t + w_c + t
    return (w_t + t / 2) / n - 0.5 if n else 0.0


def _sign_p(w_t: int, w_c: int) -> float:
    return float(stats.binomtest(w_t, w_t + w_c, 0.5).pvalue) if w_t + w_c else 1.0


def interleaving_analysis(
    h_treatment: ArrayLike,
    h_control: ArrayLike,
    units: Sequence[Hashable] | None = None,
    *,
    competitive_only: bool | None = None,
) -> InterleavingResult:
    """Wins, losses, ties, Delta and the sign test of per-query credits (from `interleaving.credit`).

    ``units`` (one id per query; default: every query its own unit) collapses the queries of a unit
    to one vote: the sign of the unit's total preference, sum(h_T - h_C) over its queries.
    """
    ht, hc = np.asarray(h_treatment, dtype=np.float64), np.asarray(h_control, dtype=np.float64)
    if ht.shape != hc.shape or ht.ndim != 1:
        raise ValueError(f"h_treatment and h_control must be equal-length 1-D arrays: {ht.shape}, {hc.shape}")
    w_t, w_c = int(np.sum(ht > hc)), int(np.sum(hc > ht))
    t = int(ht.size - w_t - w_c)
    if units is None:
        per_unit = ht - hc
    else:
        if len(units) != ht.size:
            raise ValueError(f"{len(units)} unit ids for {ht.size} queries")
        _, inverse = np.unique(np.asarray([str(u) for u in units]), return_inverse=True)
        per_unit = np.bincount(inverse, weights=ht - hc)
    uw_t, uw_c = int(np.sum(per_unit > 0)), int(np.sum(per_unit < 0))
    ut = int(per_unit.size - uw_t - uw_c)
    return InterleavingResult(
        queries=int(ht.size),
        wins_treatment=w_t,
        wins_control=w_c,
        ties=t,
        delta=_delta(w_t, w_c, t),
        p_value=_sign_p(w_t, w_c),
        units=int(per_unit.size),
        unit_wins_treatment=uw_t,
        unit_wins_control=uw_c,
        unit_ties=ut,
        unit_delta=_delta(uw_t, uw_c, ut),
        unit_p_value=_sign_p(uw_t, uw_c),
        competitive_only=competitive_only,
    )
