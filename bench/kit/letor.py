"""LETOR evaluation for the quality bench: per-query metrics of the served order, the baseline rankers
(ridge, LightGBM LambdaMART fixed and CV-tuned) and pooled / repeated-CV summaries with paired bootstraps."""

from __future__ import annotations

from typing import Any

import numpy as np

from cotrr_ray.core.features import CandidateList, FeatureNormalizer
from cotrr_ray.core.metrics import bootstrap_ci, calibration_report, paired_bootstrap_ci, ranking_report
from cotrr_ray.core.ranking import model_order, order_scores
from cotrr_ray.training.crossfit import assign_folds
from cotrr_ray.training.evaluate import RANKING_METRICS

OURS = "cotrr-ray"


METHODS = ("upstream", "ridge", "lambdamart_fixed", "lambdamart_cv", OURS)


CROSSFIT_SALT = "cotrr-crossfit"  # = cotrr_ray.training.crossfit.cross_fit's default: inner folds == cross-fit folds


def per_query(lists: list[CandidateList], window_scores: list[np.ndarray], thr: float) -> dict[str, np.ndarray]:
    """Per-query nDCG@1/5/10 and MRR of the served order (window by score, tail upstream), exactly
    as `evaluate_lists` computes its "model" variant. Arrays hold the queries with a relevant
    candidate, in list order (the skip rule depends on labels only, so methods stay aligned)."""
    pairs = [
        (order_scores(model_order(np.asarray(s, np.float64), len(cl))), cl.labels)
        for cl, s in zip(lists, window_scores, strict=True)
    ]
    rep = ranking_report(pairs, relevant_threshold=thr)
    return {m: rep[m] for m in RANKING_METRICS}


def mean_ndcg10(lists: list[CandidateList], scores: list[np.ndarray], thr: float) -> tuple[float, int]:
    v = per_query(lists, scores, thr)["ndcg@10"]
    return (float(v.sum()), int(v.size))


def split_rows(scores: np.ndarray, lists: list[CandidateList]) -> list[np.ndarray]:
    out, o = [], 0
    for cl in lists:
        out.append(scores[o : o + cl.window])
        o += cl.window
    return out


def _x_norm(lists: list[CandidateList], norm: FeatureNormalizer, group: str) -> np.ndarray:
    return np.concatenate([norm.transform(cl)["candidate"][group] for cl in lists])


def _x_raw(lists: list[CandidateList], group: str) -> np.ndarray:
    return np.concatenate([cl.features[group] for cl in lists])


def _y(lists: list[CandidateList]) -> np.ndarray:
    return np.concatenate([cl.labels[: cl.window] for cl in lists])  # type: ignore[index]


def inner_folds(lists: list[CandidateList], k: int) -> list[tuple[list[CandidateList], list[CandidateList]]]:
    fold = assign_folds([cl.query_id for cl in lists], k, CROSSFIT_SALT)
    return [
        ([cl for cl, f in zip(lists, fold) if f != i], [cl for cl, f in zip(lists, fold) if f == i]) for i in range(k)
    ]


def ridge_method(train, test, spec, group, k, s: Any, thr) -> tuple[list[np.ndarray], dict[str, Any]]:
    from sklearn.linear_model import Ridge

    totals = np.zeros(len(s.ridge_alphas))
    count = 0
    for a, b in inner_folds(train, k):
        norm = FeatureNormalizer(spec).fit(a)
        xa, xb, ya = _x_norm(a, norm, group), _x_norm(b, norm, group), _y(a)
        for j, alpha in enumerate(s.ridge_alphas):
            tot, n = mean_ndcg10(b, split_rows(Ridge(alpha=alpha).fit(xa, ya).predict(xb), b), thr)
            totals[j] += tot
        count += n
    best = int(np.argmax(totals))
    alpha = s.ridge_alphas[best]
    norm = FeatureNormalizer(spec).fit(train)
    model = Ridge(alpha=alpha).fit(_x_norm(train, norm, group), _y(train))
    return split_rows(model.predict(_x_norm(test, norm, group)), test), {
        "alpha": alpha,
        "inner_ndcg@10": float(totals[best] / max(count, 1)),
    }


def _lgb(params: dict[str, Any], seed: int = 0):
    import lightgbm as lgb

    return lgb.LGBMRanker(objective="lambdarank", verbose=-1, n_jobs=1, random_state=seed, **params)


def _lgb_fit(params, lists, group):
    return _lgb(params).fit(_x_raw(lists, group), _y(lists).astype(int), group=[cl.window for cl in lists])


def lgb_fixed_method(train, test, group, s: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    model = _lgb_fit(s.lgb_fixed, train, group)
    return split_rows(model.predict(_x_raw(test, group)), test), dict(s.lgb_fixed)


def lgb_grid(s: Any) -> list[dict[str, Any]]:
    import itertools

    keys = sorted(s.lgb_grid)
    return [dict(s.lgb_base, **dict(zip(keys, vals))) for vals in itertools.product(*(s.lgb_grid[k] for k in keys))]


def lgb_cv_method(train, test, group, k, s: Any, thr) -> tuple[list[np.ndarray], dict[str, Any]]:
    grid = lgb_grid(s)
    totals = np.zeros((len(grid), len(s.lgb_rounds)))
    count = 0
    for a, b in inner_folds(train, k):
        xb = _x_raw(b, group)
        for g, params in enumerate(grid):
            model = _lgb_fit(dict(params, n_estimators=max(s.lgb_rounds)), a, group)
            for r, rounds in enumerate(s.lgb_rounds):
                totals[g, r] += mean_ndcg10(b, split_rows(model.predict(xb, num_iteration=rounds), b), thr)[0]
        count += mean_ndcg10(b, [np.zeros(cl.window) for cl in b], thr)[1]
    g, r = np.unravel_index(int(np.argmax(totals)), totals.shape)
    params = dict(grid[g], n_estimators=s.lgb_rounds[r])
    model = _lgb_fit(params, train, group)
    return split_rows(model.predict(_x_raw(test, group)), test), {
        **params,
        "inner_ndcg@10": float(totals[g, r] / max(count, 1)),
    }


def _summary(values: dict[str, dict[str, np.ndarray]], n_boot: int) -> tuple[dict, dict]:
    methods = {}
    for name, v in values.items():
        methods[name] = {m: float(v[m].mean()) for m in RANKING_METRICS}
        methods[name]["ndcg@10_ci"] = list(bootstrap_ci(v["ndcg@10"], n_boot=n_boot))
    paired = {}
    for name in values:
        if name == OURS:
            continue
        entry = {}
        for m in RANKING_METRICS:
            d = values[OURS][m] - values[name][m]
            entry[m] = {
                "mean": float(d.mean()),
                "ci": list(paired_bootstrap_ci(values[OURS][m], values[name][m], n_boot=n_boot)),
                "wins": int((d > 1e-12).sum()),
                "losses": int((d < -1e-12).sum()),
            }
        paired[f"{OURS} - {name}"] = entry
    return methods, paired


CALIBRATION_KEYS = {  # run_part's "cal" key -> report name
    "calibrated": "cross_fit_isotonic",
    "unaligned": "cross_fit_unaligned",
    "raw": "raw_sigmoid",
    "base_rate": "base_rate",
}


def pooled_cal(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([r["cal"][key] for r in parts]) for key in parts[0]["cal"]}


def _calibration(parts: list[dict[str, Any]]) -> dict[str, Any]:
    cal = pooled_cal(parts)
    return {name: calibration_report(cal[key], cal["y"]) for key, name in CALIBRATION_KEYS.items()}


def split_result(parts: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """One split's parts pooled: each test query once."""
    pooled = {m: {k: np.concatenate([r["values"][m][k] for r in parts]) for k in RANKING_METRICS} for m in METHODS}
    methods, paired = _summary(pooled, n_boot)
    return {
        "queries": int(pooled[OURS]["ndcg@10"].size),
        "methods": methods,
        "paired": paired,
        "calibration": _calibration(parts),
        "per_part": [r["info"] for r in parts],
        "seconds": round(sum(r["info"]["seconds"] for r in parts), 1),
    }


def repeated_result(parts: list[dict[str, Any]], s: Any) -> dict[str, Any]:
    """Repeated CV: each query's metrics averaged over the repeats (one test per repeat), so the
    bootstrap still resamples queries, the unit that is independent; calibration pools every row."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {m: {k: {} for k in RANKING_METRICS} for m in METHODS}
    for r in parts:
        for m in METHODS:
            for k in RANKING_METRICS:
                for q, v in zip(r["query_ids"], r["values"][m][k], strict=True):
                    acc[m][k].setdefault(q, []).append(float(v))
    qids = sorted(acc[OURS]["ndcg@10"])
    assert all(len(acc[OURS]["ndcg@10"][q]) == s.cv_repeats for q in qids), "each query is tested once per repeat"
    averaged = {m: {k: np.array([np.mean(acc[m][k][q]) for q in qids]) for k in RANKING_METRICS} for m in METHODS}
    methods, paired = _summary(averaged, s.n_boot)
    return {
        "queries": len(qids),
        "repeats": s.cv_repeats,
        "methods": methods,
        "paired": paired,
        "calibration": _calibration(parts),
        "seconds": round(sum(r["info"]["seconds"] for r in parts), 1),
    }
