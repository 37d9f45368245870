"""One experiment's report from the event log: per-arm metrics, SRM, sequential and fixed-horizon tests,
the interleaving preference, and how the effect and its confidence sequence moved over time.

    report = experiment_report("artifacts/events", "rerank-v1")      # a JSON-able dict
    print(format_report(report))                                      # the terminal table
    plot_report(report, "artifacts/report")                           # PNGs

The experiment id is the routing config's `experiment_salt`: a new salt reshuffles every unit, so
it starts a new experiment, and every decision record carries it. The SQL is `analysis`' (DuckDB);
the tests are `stats`'. Everything is computed per randomisation unit.

What is tested:
- A/B (arms "treatment" vs "control"): clicks per query with the mSPRT, looked at `looks` times
  between the first and the last decision (the confidence sequence is valid at every look, so the
  timeline can be watched while the experiment runs), plus a fixed-horizon Welch test of clicks per
  query, CTR@k, abandonment and MRR at the end. All are ratio metrics over units (delta method).
- Interleaving (arm "interleave", mode interleave): per query the clicks credited to each team
  (competitive rounds only, by default), the sign test per query and per unit, and the mSPRT on the
  per-unit mean preference (h_treatment - h_control), over the same looks.
- SRM: distinct units per arm against the configured rollout, when the rollout stayed constant.

The mixture scales (tau) are settings chosen before the experiment, not estimated from it: a
data-dependent tau voids the mSPRT's guarantee (`stats.default_tau`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from cotrr_ray.experiments import analysis
from cotrr_ray.experiments import stats as S

CONTROL, TREATMENT, INTERLEAVE = "control", "treatment", "interleave"


class ReportSettings(BaseModel):
    """How an experiment is analysed; fixed before the experiment starts."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.05, gt=0, lt=1, description="Level of the sequential and fixed-horizon tests.")
    srm_alpha: float = Field(
        0.001, gt=0, lt=1, description="SRM alarm level (GrowthBook's 0.001: rare false alarms over many experiments)."
    )
    k: int = Field(10, ge=1, description="Cut-off of CTR@k.")
    looks: int = Field(20, ge=1, le=1000, description="Evenly spaced looks between the first and the last decision.")
    tau_clicks_per_query: float = Field(
        0.08,
        gt=0,
        description=(
            "mSPRT mixture scale for the A/B difference in clicks per query: 0.1 x the per-unit sd of the "
            "simulated demo traffic (bench/results/experiments-offline.json, pilot); set it from your own "
            "historical per-unit sd (stats.default_tau)."
        ),
    )
    tau_preference: float = Field(
        0.07,
        gt=0,
        description=(
            "mSPRT mixture scale for the per-unit interleaving preference (h_treatment - h_control per "
            "query, averaged per unit); same rule and source as tau_clicks_per_query."
        ),
    )
    competitive_only: bool = Field(
        True, description="Credit interleaving clicks on competitive rounds only (the two rankers disagreed)."
    )


def _columns(t: pa.Table, arm: str, *names: str) -> list[np.ndarray]:
    mask = np.asarray(t.column("arm").to_pylist()) == arm
    return [np.asarray(t.column(n).to_numpy(), dtype=np.float64)[mask] for n in names]


def _ratio(t: pa.Table, arm: str, num: str, den: str) -> S.ArmSummary | None:
    x, y = _columns(t, arm, num, den)
    if x.size < 2 or y.sum() <= 0:
        return None
    return S.ratio_summary(x, y)


def _with_abandoned(t: pa.Table) -> pa.Table:
    abandoned = np.asarray(t.column("queries").to_numpy()) - np.asarray(t.column("clicked_queries").to_numpy())
    return t.append_column("abandoned", pa.array(abandoned, type=pa.int64()))


# (metric, numerator, denominator) of the fixed-horizon A/B tests; the first is also sequential
AB_METRICS = (
    ("clicks_per_query", "clicks", "queries"),
    ("ctr_at_k", "clicks_at_k", "shown_at_k"),
    ("abandonment", "abandoned", "queries"),
    ("mrr", "rr_sum", "queries"),
)


def _srm(units: pa.Table, span: dict[str, Any], alpha: float) -> dict[str, Any]:
    rollouts = span["rollout_percentages"] or []
    if len(rollouts) != 1:
        return {"skipped": f"the rollout changed during the experiment ({rollouts}): no single expected split"}
    share = float(rollouts[0]) / 100
    arms = set(units.column("arm").to_pylist())
    exposed = INTERLEAVE if INTERLEAVE in arms else TREATMENT
    weights = {CONTROL: 1 - share, exposed: share}
    if not 0 < share < 1:
        return {"skipped": f"rollout {rollouts[0]}%: one arm only"}
    if not arms <= set(weights):
        return {"skipped": f"arms {sorted(arms)} do not match the rollout's {sorted(weights)}"}
    pairs = zip(units.column("unit_id").to_pylist(), units.column("arm").to_pylist())
    return asdict(S.srm_from_exposures(pairs, weights, alpha=alpha))


def _ab(units: pa.Table, alpha: float) -> dict[str, Any] | None:
    arms = set(units.column("arm").to_pylist())
    if not {CONTROL, TREATMENT} <= arms:
        return None
    out: dict[str, Any] = {}
    for metric, num, den in AB_METRICS:
        c, t = _ratio(units, CONTROL, num, den), _ratio(units, TREATMENT, num, den)
        if c is None or t is None or c.var_of_mean + t.var_of_mean <= 0:
            out[metric] = {"skipped": "fewer than 2 units with data in an arm, or no variance"}
            continue
        out[metric] = {
            "control": c.mean,
            "treatment": t.mean,
            "fixed": asdict(S.fixed_horizon_test(c, t, alpha=alpha)),
        }
    return out


def _preference_by_unit(q: pa.Table, until: float | None = None) -> np.ndarray:
    ts = np.asarray(q.column("ts").to_numpy(), dtype=np.float64)
    keep = np.ones(ts.size, bool) if until is None else ts <= until
    pref = (np.asarray(q.column("h_treatment").to_numpy()) - np.asarray(q.column("h_control").to_numpy()))[keep]
    units = np.asarray(q.column("unit_id").to_pylist(), dtype=object)[keep]
    if pref.size == 0:
        return pref.astype(np.float64)
    _, inverse, counts = np.unique(units.astype(str), return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=pref.astype(np.float64)) / counts


def _look(result: S.MSPRTResult, at: float, n: int, test: S.SequentialTest) -> dict[str, Any]:
    return {
        "ts": at,
        "units": n,
        "effect": result.dhat,
        "cs_low": test.ci_low,
        "cs_high": test.ci_high,
        "p_value": test.p_value,
    }


def _timeline(con, experiment_id: str, cuts: np.ndarray, q: pa.Table | None, st: ReportSettings) -> dict[str, Any]:
    ab_test = S.SequentialTest(tau=st.tau_clicks_per_query, alpha=st.alpha)
    il_test = S.SequentialTest(tau=st.tau_preference, alpha=st.alpha)
    ab, il = [], []
    for cut in cuts:
        units = analysis.unit_table(con, experiment_id, k=st.k, until=float(cut))
        c, t = _ratio(units, CONTROL, "clicks", "queries"), _ratio(units, TREATMENT, "clicks", "queries")
        if c is not None and t is not None and c.var_of_mean + t.var_of_mean > 0:
            ab.append(_look(ab_test.update(c, t), float(cut), c.n + t.n, ab_test))
        if q is not None and q.num_rows:
            pref = _preference_by_unit(q, float(cut))
            if pref.size >= 2 and pref.var(ddof=1) > 0:
                il.append(_look(il_test.update_paired(S.summarize(pref)), float(cut), int(pref.size), il_test))
    return {
        "ab": ab,
        "ab_final": asdict(ab_test.history[-1]) | {"p_value": ab_test.p_value} if ab else None,
        "interleaving": il,
        "interleaving_final": asdict(il_test.history[-1]) | {"p_value": il_test.p_value} if il else None,
    }


def experiment_report(
    source: str | duckdb.DuckDBPyConnection, experiment_id: str, settings: ReportSettings | None = None
) -> dict[str, Any] | None:
    """Everything the log says about `experiment_id` (an `experiment_salt`); None when it has no decision."""
    st = settings or ReportSettings()
    con = analysis.connect(source) if isinstance(source, str) else source
    span = analysis.decision_span(con, experiment_id)
    if not span["decisions"]:
        return None
    units = _with_abandoned(analysis.unit_table(con, experiment_id, k=st.k))
    arms = analysis.arm_metrics(con, experiment_id, k=st.k).to_pylist()
    q = analysis.interleaved_queries(con, experiment_id, competitive_only=st.competitive_only)
    interleaving = None
    if q.num_rows:
        res = S.interleaving_analysis(
            q.column("h_treatment").to_numpy(),
            q.column("h_control").to_numpy(),
            q.column("unit_id").to_pylist(),
            competitive_only=st.competitive_only,
        )
        interleaving = asdict(res)
    first, last = float(span["first_ts"]), float(span["last_ts"])
    cuts = np.linspace(first, last, st.looks + 1)[1:] if last > first else np.array([last])
    return {
        "experiment_id": experiment_id,
        "span": span,
        "settings": st.model_dump(),
        "arms": arms,
        "srm": _srm(units, span, st.srm_alpha),
        "ab": _ab(units, st.alpha),
        "interleaving": interleaving,
        "timeline": _timeline(con, experiment_id, cuts, q if q.num_rows else None, st),
        "feedback": analysis.feedback_summary(con),
    }


# ----------------------------------------------------------------------------- presentation


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_report(report: dict[str, Any]) -> str:
    """The report as a terminal table."""
    lines = [
        f"experiment {report['experiment_id']}: {report['span']['decisions']} decisions, modes "
        f"{report['span']['modes']}, rollout {report['span']['rollout_percentages']}"
    ]
    cols = [
        "arm",
        "units",
        "queries",
        "clicks_per_query",
        "ctr_at_k",
        "abandonment",
        "mrr",
        "latency_p50_ms",
        "latency_p99_ms",
        "fallback_rate",
    ]
    lines.append("  ".join(f"{c:>16}" for c in cols))
    for row in report["arms"]:
        lines.append("  ".join(f"{_fmt(row.get(c)):>16}" for c in cols))
    srm = report["srm"]
    lines.append(
        "SRM: "
        + (
            srm["skipped"]
            if "skipped" in srm
            else f"observed {srm['observed']} expected {_round(srm['expected'])} p={srm['p_value']:.3g} "
            f"{'FLAGGED' if srm['flagged'] else 'ok'}"
        )
    )
    for metric, r in (report["ab"] or {}).items():
        if "skipped" in r:
            lines.append(f"A/B {metric}: {r['skipped']}")
            continue
        f = r["fixed"]
        lines.append(
            f"A/B {metric}: control {r['control']:.4g} treatment {r['treatment']:.4g} "
            f"diff {f['dhat']:+.4g} [{f['ci_low']:+.4g}, {f['ci_high']:+.4g}] p={f['p_value']:.3g} (Welch)"
        )
    tl = report["timeline"]
    if tl["ab_final"]:
        a = tl["ab"][-1]
        lines.append(
            f"A/B clicks_per_query, mSPRT: diff {a['effect']:+.4g} confidence sequence "
            f"[{a['cs_low']:+.4g}, {a['cs_high']:+.4g}] always-valid p={a['p_value']:.3g}"
        )
    il = report["interleaving"]
    if il:
        lines.append(
            f"interleaving: {il['queries']} queries, wins T/C/ties {il['wins_treatment']}/"
            f"{il['wins_control']}/{il['ties']}, delta {il['delta']:+.3f} (p={il['p_value']:.3g}); per unit "
            f"{il['unit_wins_treatment']}/{il['unit_wins_control']}/{il['unit_ties']}, delta "
            f"{il['unit_delta']:+.3f} (p={il['unit_p_value']:.3g})"
        )
    if tl["interleaving_final"]:
        a = tl["interleaving"][-1]
        lines.append(
            f"interleaving preference, mSPRT: {a['effect']:+.4g} confidence sequence "
            f"[{a['cs_low']:+.4g}, {a['cs_high']:+.4g}] always-valid p={a['p_value']:.3g}"
        )
    fb = report["feedback"]
    lines.append(
        f"feedback: {fb['events']} events ({fb['duplicates']} duplicates, {fb['orphans']} orphans, "
        f"{fb['unreadable_lines']} unreadable lines)"
    )
    return "\n".join(lines)


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in d.items()}


def plot_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """PNGs: the cumulative effect with its confidence sequence (A/B and interleaving), and SRM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    tl = report["timeline"]
    for key, label in (("ab", "clicks per query, treatment - control"), ("interleaving", "preference per unit")):
        looks = tl[key]
        if not looks:
            continue
        t0 = looks[0]["ts"]
        x = [(lk["ts"] - t0) for lk in looks]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot(x, [lk["effect"] for lk in looks], marker="o", label="cumulative effect")
        ax.fill_between(
            x,
            [lk["cs_low"] for lk in looks],
            [lk["cs_high"] for lk in looks],
            alpha=0.25,
            label=f"{1 - report['settings']['alpha']:.0%} confidence sequence",
        )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="seconds since the first look", ylabel=label, title=f"{report['experiment_id']}: {key}")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = out / f"{report['experiment_id']}-{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    srm = report["srm"]
    if "observed" in srm:
        fig, ax = plt.subplots(figsize=(4.8, 3.2))
        arms = list(srm["observed"])
        xs = np.arange(len(arms))
        ax.bar(xs - 0.2, [srm["observed"][a] for a in arms], 0.4, label="observed units")
        ax.bar(xs + 0.2, [srm["expected"][a] for a in arms], 0.4, label="expected")
        ax.set_xticks(xs, arms)
        ax.set_title(f"SRM p={srm['p_value']:.3g} ({'flagged' if srm['flagged'] else 'ok'})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{report['experiment_id']}-srm.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
