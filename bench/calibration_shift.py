"""Calibration under a shift between query sets: list-aware calibrators against the shipped isotonic one.

    python bench/calibration_shift.py [--data FILE] [--test FILE] [--config configs/mslr.yaml] [--json OUT] [--set key=value ...]

The question (issue 16): the shipped calibrator maps a raw score to P(label >= threshold) with one
isotonic curve for every query, but queries differ in how many of their candidates are relevant,
and a new query set need not match the training queries' mix. Calibrators for ranking models often
condition on the list as well as the score: the score standardised within its list, its rank in
the list, the list's score spread. Each such candidate is measured here, honestly:

1. train: the shipped recipe on every query of `--data` (`crossfit.fit_cross_fitted`, in-process,
   the config exactly as given; the model `train_job.py --config configs/mslr.yaml` publishes), which
   gives the final model and the out-of-fold (OOF) scores of every training query, aligned onto the
   final model's scale: the rows the shipped calibrator is fitted on;
2. choose: every calibrator is scored by grouped K-fold CV over the training queries' OOF rows
   (fitted on the other queries' rows, scored on the held-out queries'); the one with the lowest
   pooled Brier score is the choice. Only training queries take part;
3. test: every calibrator refitted on all OOF rows and scored once on the `--test` queries (scored by
   the final model), with 95% bootstrap intervals over queries. The choice is marked; the others are
   shown for the record and choose nothing.

Constant predictors are the reference: the training base rate (what a model with no information
would say) and the test file's own base rate (an oracle no deployed model has).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kit.machine import basic_machine  # noqa: E402
from kit.report import write_json  # noqa: E402

from cotrr_ray.config import TrainConfig  # noqa: E402
from cotrr_ray.core.calibration import IsotonicCalibrator  # noqa: E402
from cotrr_ray.core.features import CandidateList, labels01  # noqa: E402
from cotrr_ray.core.metrics import brier, calibration_report  # noqa: E402
from cotrr_ray.data.readers import file_fingerprint, letor_spec, read_letor  # noqa: E402
from cotrr_ray.training.crossfit import assign_folds, fit_cross_fitted, train_in_process  # noqa: E402
from cotrr_ray.training.prepare import all_queries_data, window_logits  # noqa: E402

CHOICE_SALT = "calibration-shift-choice"  # folds of the choice CV: not the cross-fit folds


# --------------------------------------------------------------------------- list features


def list_features(z: np.ndarray) -> dict[str, np.ndarray]:
    """Per candidate of one list: its score and what the list says about it."""
    z = np.asarray(z, np.float64)
    n = z.size
    mean, sd = z.mean(), z.std()
    rank = np.empty(n)
    rank[np.argsort(-z, kind="stable")] = np.arange(n)
    return {
        "logit": z,
        "list_z": (z - mean) / sd if sd > 1e-9 else np.zeros(n),
        "centred": z - mean,
        "rank_frac": rank / max(n - 1, 1),  # 0 = the list's top score
        "rank_score": 1.0 - rank / max(n - 1, 1),  # increasing in the score, for an isotonic fit
        "list_mean": np.full(n, mean),
        "list_sd": np.full(n, sd),
        "list_max": np.full(n, z.max()),
        "log_len": np.full(n, np.log(n)),
    }


def _stack(scores: list[np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    feats = [list_features(z) for z in scores]
    return np.column_stack([np.concatenate([f[k] for f in feats]) for k in keys])


# --------------------------------------------------------------------------- calibrators

Fit = Callable[[list[np.ndarray], np.ndarray], Callable[[list[np.ndarray]], np.ndarray]]


def isotonic_on(key: str) -> Fit:
    def fit(scores: list[np.ndarray], y: np.ndarray):
        cal = IsotonicCalibrator(min_samples=1).fit(_stack(scores, (key,))[:, 0], y)
        return lambda s: cal.predict(_stack(s, (key,))[:, 0])

    return fit


def logistic_on(keys: tuple[str, ...], *, on_isotonic: bool = False, C: float = 1.0) -> Fit:
    """Logistic regression on list features (standardised); with `on_isotonic`, the logit of the
    shipped isotonic probability is a feature too (a list-aware correction of the shipped map)."""

    def design(scores, iso):
        x = _stack(scores, keys)
        if iso is not None:
            p = np.clip(iso.predict(np.concatenate(scores)), 1e-4, 1 - 1e-4)
            x = np.column_stack([x, np.log(p / (1 - p))])
        return x

    def fit(scores: list[np.ndarray], y: np.ndarray):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        iso = IsotonicCalibrator(min_samples=1).fit(np.concatenate(scores), y) if on_isotonic else None
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(design(scores, iso), y)
        return lambda s: model.predict_proba(design(s, iso))[:, 1]

    return fit


LIST = ("logit", "list_z", "rank_frac", "list_mean", "list_sd", "list_max", "log_len")
CALIBRATORS: dict[str, Fit] = {
    "isotonic(logit) [shipped]": isotonic_on("logit"),
    "platt(logit)": logistic_on(("logit",)),
    "isotonic(logit - list mean)": isotonic_on("centred"),
    "isotonic(within-list z)": isotonic_on("list_z"),
    "isotonic(within-list rank)": isotonic_on("rank_score"),
    "logistic(logit + list features)": logistic_on(LIST),
    "logistic(isotonic + list features)": logistic_on(LIST, on_isotonic=True),
}
SHIPPED = "isotonic(logit) [shipped]"


# --------------------------------------------------------------------------- phases


def choose(scores: list[np.ndarray], lists: list[CandidateList], thr: float, k: int) -> dict[str, Any]:
    """Phase choose: grouped K-fold CV of every calibrator over the training queries' OOF rows."""
    fold = assign_folds([cl.query_id for cl in lists], k, CHOICE_SALT)
    ys = [labels01([cl], thr) for cl in lists]
    out = {}
    for name, fit in CALIBRATORS.items():
        p = [None] * len(lists)
        for i in range(k):
            tr = [j for j in range(len(lists)) if fold[j] != i]
            f = fit([scores[j] for j in tr], np.concatenate([ys[j] for j in tr]))
            for j in np.flatnonzero(fold == i):
                p[j] = f([scores[j]])
        out[name] = calibration_report(np.concatenate(p), np.concatenate(ys))
    chosen = min(out, key=lambda n: out[n]["brier"])
    return {"folds": k, "salt": CHOICE_SALT, "scores": out, "chosen": chosen}


def query_bootstrap(p: list[np.ndarray], y: list[np.ndarray], n_boot: int, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of ECE (equal width) and Brier, resampling queries (rows of a query move together)."""
    from cotrr_ray.core.metrics import ece

    rng = np.random.default_rng(seed)
    e, b = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(p), len(p))
        pp, yy = np.concatenate([p[i] for i in idx]), np.concatenate([y[i] for i in idx])
        e.append(ece(pp, yy))
        b.append(brier(pp, yy))
    q = lambda v: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]  # noqa: E731
    return {"ece_equal_width_ci": q(e), "brier_ci": q(b)}


def run(data: str, test: str, config: str, overrides: list[str], n_boot: int, say=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(config, [*overrides, f"data.path={data}"])
    d = cfg.data
    thr = d.relevance_threshold

    def read(path):
        return read_letor(
            path, num_features=d.letor_num_features, upstream_feature=d.letor_upstream_feature, window=cfg.model.top_m
        )

    lists, test_lists = read(data), read(test)
    spec = letor_spec(d.letor_num_features)
    say(f"train: {data} ({len(lists)} queries); test: {test} ({len(test_lists)} queries)")

    # Phase train: the shipped recipe.
    prepared = all_queries_data(cfg, spec, lists, file_fingerprint(data))
    cf = fit_cross_fitted(cfg, prepared, lambda c, dd: train_in_process(c, dd, select="last"))
    oof, oof_lists = cf.result.calibrated_logits, cf.result.lists
    test_scores = window_logits(cf.model, test_lists, prepared)
    say(f"recipe trained ({cf.fit_s + cf.cross_fit_s:.0f} s): {len(oof_lists)} queries of OOF rows")

    # Phase choose: training queries only.
    choice = choose(oof, oof_lists, thr, cfg.calibration.folds)
    say(f"choice by grouped CV on training queries (lowest Brier): {choice['chosen']}")

    # Phase test: each calibrator refitted on every OOF row, scored once on the test queries.
    y_train = labels01(oof_lists, thr)
    y_test = [labels01([cl], thr) for cl in test_lists]
    y_all = np.concatenate(y_test)
    rates = {"train": float(y_train.mean()), "test": float(y_all.mean())}
    results = {}
    predictions = {name: fit(oof, y_train)(test_scores) for name, fit in CALIBRATORS.items()}
    predictions["constant: training base rate"] = np.full(y_all.size, rates["train"])
    predictions["constant: test base rate (oracle)"] = np.full(y_all.size, rates["test"])
    for name, p in predictions.items():
        per_query = np.split(np.asarray(p), np.cumsum([len(v) for v in y_test])[:-1])
        results[name] = {**calibration_report(p, y_all), **query_bootstrap(per_query, y_test, n_boot)}
    per_query_rate = lambda ls: [float(labels01([cl], thr).mean()) for cl in ls]  # noqa: E731
    return {
        "what": "calibration of P(label >= threshold) on queries neither model nor calibrator saw; choice on training queries only",
        "command": "python bench/calibration_shift.py " + " ".join(sys.argv[1:]),
        "data": data,
        "data_fingerprint": file_fingerprint(data),
        "test_data": test,
        "test_data_fingerprint": file_fingerprint(test),
        "config": config,
        "overrides": overrides,
        "base_rate": rates,
        "per_query_base_rate_sd": {
            "train": float(np.std(per_query_rate(lists))),
            "test": float(np.std(per_query_rate(test_lists))),
        },
        "choice": choice,
        "chosen": choice["chosen"],
        "test": results,
        "machine": {**basic_machine(), "load_avg_end": list(os.getloadavg()), "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def format_table(res: dict[str, Any]) -> str:
    r = res["base_rate"]
    lines = [
        f"base rate: training queries {r['train']:.3f}, test queries {r['test']:.3f}; per-query base rate sd "
        f"{res['per_query_base_rate_sd']['train']:.3f} / {res['per_query_base_rate_sd']['test']:.3f}",
        "",
        f"choice (grouped {res['choice']['folds']}-fold CV over the training queries' OOF rows):",
        f"{'calibrator':<40}{'ECE-width':>10}{'Brier':>8}",
    ]
    for name, c in res["choice"]["scores"].items():
        mark = "  <- chosen" if name == res["chosen"] else ""
        lines.append(f"{name:<40}{c['ece_equal_width']:>10.4f}{c['brier']:>8.4f}{mark}")
    lines += [
        "",
        "test queries (scored once):",
        f"{'calibrator':<40}{'ECE-width [95% CI]':>26}{'ECE-mass':>10}{'Brier [95% CI]':>26}{'logloss':>9}",
    ]
    for name, c in res["test"].items():
        mark = "  <- chosen" if name == res["chosen"] else ""
        e, b = c["ece_equal_width_ci"], c["brier_ci"]
        lines.append(
            f"{name:<40}{c['ece_equal_width']:>8.4f} [{e[0]:.3f}, {e[1]:.3f}]{c['ece_equal_mass']:>10.4f}"
            f"{c['brier']:>8.4f} [{b[0]:.3f}, {b[1]:.3f}]{c['log_loss']:>9.4f}{mark}"
        )
    lines.append(f"wall {res['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mslr-web10k-sample" / "train.txt"))
    p.add_argument("--test", default=str(REPO / "artifacts" / "data" / "mslr-web10k-fold1-test-5k.txt"))
    p.add_argument("--config", default=str(REPO / "configs" / "mslr.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="TrainConfig override key.path=value")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    res = run(args.data, args.test, args.config, args.overrides, args.bootstrap)
    print(format_table(res), flush=True)
    if args.json_out:
        write_json(res, Path(args.json_out), indent=1, newline=True)
    return res


if __name__ == "__main__":
    main()
