"""Quality bench on LETOR data: cotrr-ray vs the upstream order, ridge and LightGBM LambdaMART.

    python bench/quality_bench.py [--quick] [--json OUT] [--png OUT] [--data FILE] [--repeats R]
                                  [--test FILE] [--config configs/mslr.yaml] [--set key.path=value ...]
                                  [--no-fixed] [--no-select]

Protocol (identical query splits for every method, all scored by `cotrr_ray.core.metrics` through the
same per-query path as `cotrr_ray.training.evaluate.evaluate_lists`):

* splits: grouped 5-fold CV by query over the file (each query is tested exactly once; results
  pooled over the folds), repeated 3 times with different fold assignments (`--repeats`): on a few
  dozen queries which queries share a fold moves every method by a few points, so the headline
  averages each query's metrics over the repeats (the bootstrap still resamples queries) and each
  repeat is also reported alone; one fixed 70/30 split by a hash of the query id; and, with
  `--test FILE`, a held-out file: every method trained on all queries of `--data` (choices again by
  inner CV on them) and scored on the file's queries, which must not share an id with `--data`
  (`bench/fetch_mslr_test.py` fetches 43 MSLR Fold-1 test queries for the sample);
* inside each split only the training queries are used for any choice: every tuned method picks its
  hyper-parameters by inner grouped K-fold CV (K = `calibration.folds` of the config) over the
  training queries, then refits on all of them and scores the test queries once;
* upstream: feature `letor_upstream_feature` (MSLR: 110, BM25) descending;
* ridge: sklearn Ridge on the bundle's normalised features (signed log1p + standardise, fitted on
  the training queries), alpha by inner CV;
* LambdaMART (LightGBM, objective lambdarank): a fixed, stated parameter set, and a CV-tuned one
  (grid x number of trees by inner CV: 9 x 8 = 72 settings);
* cotrr-ray, in two phases per split. (1) select (`select_cotrr`): every choice it gets, by inner
  grouped K-fold CV over the split's training queries only: `Settings.variants` (no attention /
  LayerNorm on the feature projection / one attention block) x epochs 1..`max_epochs`, the best
  3-epoch moving average of the pooled inner nDCG@10 (as many settings as LambdaMART's grid). So
  the outer test queries choose nothing: a nested CV for the choices in that grid. (2) train: the
  shipped job's recipe with that choice, `cotrr_ray.training.crossfit.fit_cross_fitted` (what
  `train_job.py` runs under `evaluation.method: cross_fit`, there through Ray Train): the final model
  on every training query for exactly the chosen epochs, K cross-fit fold models, the isotonic
  calibrator on their out-of-fold scores mapped onto the final model's scale; then `Bundle.save` ->
  `Bundle.load` -> `Bundle.score` on the test queries. `bench/mslr_tuning.py` runs phase (1) on the
  whole sample: that choice is configs/mslr.yaml, so the held-out-file split trains the shipped model.
  `--no-select` trains the config exactly as given instead;
* paired per-query differences cotrr-ray - baseline with percentile bootstrap intervals;
* calibration of P(label >= threshold) on the test queries (never seen by model or calibrator):
  ECE (15 bins, equal width / equal mass), Brier, log loss for the cross-fitted calibrator, the raw
  sigmoid and a constant base-rate predictor (the training queries' rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kit.letor import (  # noqa: E402
    CALIBRATION_KEYS,
    METHODS,
    OURS,
    inner_folds,
    lgb_cv_method,
    lgb_fixed_method,
    lgb_grid,
    mean_ndcg10,
    per_query,
    pooled_cal,
    repeated_result,
    ridge_method,
    split_result,
)
from kit.machine import basic_machine  # noqa: E402
from kit.report import jsonable  # noqa: E402

from cotrr_ray.bundles.bundle import Bundle  # noqa: E402
from cotrr_ray.config import TrainConfig  # noqa: E402
from cotrr_ray.core.features import (
    CandidateList,  # noqa: E402
    labels01,  # noqa: E402
)
from cotrr_ray.core.metrics import ranking_report, sigmoid  # noqa: E402
from cotrr_ray.data.readers import file_fingerprint, letor_spec, read_letor  # noqa: E402
from cotrr_ray.data.splits import split_by_query  # noqa: E402
from cotrr_ray.training.checkpoints import model_from_state  # noqa: E402
from cotrr_ray.training.crossfit import (  # noqa: E402
    assign_folds,
    fit_cross_fitted,
    fit_oof_calibrator,
    train_in_process,
)
from cotrr_ray.training.evaluate import RANKING_METRICS, evaluate_lists  # noqa: E402
from cotrr_ray.training.prepare import (  # noqa: E402
    all_queries_data,
    prepare_splits,
    window_logits,
)

LABELS = {
    "upstream": "upstream order",
    "ridge": "ridge (CV alpha)",
    "lambdamart_fixed": "LambdaMART fixed",
    "lambdamart_cv": "LambdaMART CV-tuned",
    OURS: "cotrr-ray (CV choices)",
}
CV_SALT = "quality-bench-cv"
FIXED_SALT = "quality-bench-fixed"


@dataclass
class Settings:
    outer_folds: int = 5
    cv_repeats: int = 3  # repeated grouped CV: each repeat deals the queries into folds with its own salt
    fixed_split: dict[str, float] | None = field(default_factory=lambda: {"train": 0.7, "test": 0.3})
    max_epochs: int = 24  # cotrr-ray epoch grid: 1..max_epochs
    smooth: int = 3  # moving-average window over the inner-CV epoch curve
    ridge_alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    lgb_fixed: dict[str, Any] = field(
        default_factory=lambda: {
            "n_estimators": 200,
            "learning_rate": 0.05,
            "num_leaves": 15,
            "min_child_samples": 20,
            "subsample": 0.8,
            "subsample_freq": 1,
            "colsample_bytree": 0.8,
        }
    )
    lgb_grid: dict[str, list[Any]] = field(
        default_factory=lambda: {"num_leaves": [7, 15, 31], "min_child_samples": [5, 20, 50]}
    )
    lgb_base: dict[str, Any] = field(
        default_factory=lambda: {"learning_rate": 0.05, "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8}
    )
    lgb_rounds: tuple[int, ...] = (25, 50, 75, 100, 150, 200, 250, 300)
    n_boot: int = 2000
    max_queries: int | None = None
    model_overrides: tuple[str, ...] = ()
    # cotrr-ray's choices, made inside every split by inner CV (select_cotrr): these variants x epochs
    # 1..max_epochs (3 x 24 = 72 settings, as many as LambdaMART's 9-setting grid x 8 tree counts).
    # Absolute values, so the grid does not depend on which variant the shipped config holds.
    variants: tuple[dict[str, Any], ...] = (
        {"model.n_layers": 0, "model.group_norm": False},
        {"model.n_layers": 0, "model.group_norm": True},
        {"model.n_layers": 1, "model.group_norm": False},
    )
    select: bool = True  # False: the config as given, no choice (e.g. to score exactly the shipped config)


def quick_settings() -> Settings:
    return Settings(
        outer_folds=3,
        cv_repeats=2,
        max_epochs=3,
        smooth=1,
        ridge_alphas=(1.0, 100.0),
        lgb_fixed={"n_estimators": 10, "learning_rate": 0.1, "num_leaves": 7, "min_child_samples": 5},
        lgb_grid={"num_leaves": [3, 7]},
        lgb_base={"learning_rate": 0.1, "min_child_samples": 5},
        lgb_rounds=(5, 10),
        n_boot=200,
        max_queries=12,
        variants=({"model.n_layers": 1}, {"model.n_layers": 0}),
        model_overrides=(
            "model.d_model=16",
            "model.n_heads=2",
            "model.n_layers=1",
            "calibration.folds=2",
            "calibration.min_samples=10",
        ),
    )


# --------------------------------------------------------------------------- metrics


# --------------------------------------------------------------------------- baselines


# --------------------------------------------------------------------------- cotrr-ray


def with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    # patience = max_epochs: fit never stops early; the recipe keeps the last epoch (fixed epochs).
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_epochs": epochs, "patience": epochs})})


def with_variant(cfg: TrainConfig, variant: dict[str, Any]) -> TrainConfig:
    """`cfg` with a variant's ``key.path: value`` settings (absolute values, not deltas)."""
    raw = cfg.model_dump(mode="json")
    for key, value in variant.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if last not in node:
            raise ValueError(f"variant key {key!r} is not a TrainConfig field")
        node[last] = value
    return TrainConfig.model_validate(raw)


def variant_name(variant: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in variant.items()) or "config"


def constant_lr(cfg: TrainConfig) -> bool:
    return cfg.optim.warmup_frac == 0 and cfg.optim.min_lr_ratio == 1.0


def select_cotrr(cfg: TrainConfig, spec, train: list[CandidateList], s: Settings, thr: float) -> dict[str, Any]:
    """Phase select: every choice cotrr-ray gets (variant x epochs), by inner grouped K-fold CV over
    `train` only. Each variant's K fold models train `s.max_epochs` epochs (constant lr, so epoch E of
    that run is exactly an E-epoch run); after every epoch each scores its held-out inner fold. The
    choice is the (variant, epoch) with the best 3-epoch moving average of the pooled inner nDCG@10.
    Returns the choice and every variant's curve."""
    if not constant_lr(cfg):
        raise ValueError(
            "epoch selection reads epoch E of a longer run as an E-epoch run, which is exact only with a constant "
            "learning rate (optim.warmup_frac=0, optim.min_lr_ratio=1)"
        )
    folds = inner_folds(train, cfg.calibration.folds)
    count = sum(mean_ndcg10(b, [np.zeros(cl.window) for cl in b], thr)[1] for _, b in folds)
    table = []
    for variant in s.variants or ({},):
        cfg_v = with_epochs(with_variant(cfg, variant), s.max_epochs)
        ndcg_sum = np.zeros(s.max_epochs)
        for a, b in folds:
            data = prepare_splits(cfg_v, spec, {"train": a, "validation": b})

            def on_epoch(epoch: int, state: dict[str, Any], data=data, b=b, ndcg_sum=ndcg_sum) -> None:
                z = window_logits(model_from_state(state, data.model_config), b, data)
                ndcg_sum[epoch] += mean_ndcg10(b, z, thr)[0]

            train_in_process(cfg_v, data, select="last", on_epoch=on_epoch)
        curve = ndcg_sum / max(count, 1)
        pad = np.pad(curve, s.smooth // 2, mode="edge")
        smooth = np.convolve(pad, np.ones(s.smooth) / s.smooth, mode="valid")
        best = int(np.argmax(smooth))
        table.append(
            {
                "variant": dict(variant),
                "name": variant_name(variant),
                "epochs": best + 1,
                "inner_ndcg@10": float(curve[best]),
                "inner_ndcg@10_smoothed": float(smooth[best]),
                "inner_curve": [round(float(v), 4) for v in curve],
            }
        )
    chosen = max(range(len(table)), key=lambda i: table[i]["inner_ndcg@10_smoothed"])  # first of equals
    return {"chosen": table[chosen], "variants": table, "inner_queries": count, "inner_folds": len(folds)}


def chosen_config(cfg: TrainConfig, selection: dict[str, Any]) -> TrainConfig:
    c = selection["chosen"]
    return with_epochs(with_variant(cfg, c["variant"]), c["epochs"])


def cotrr_method(
    cfg, spec, train, test, s: Settings, thr, data_path, workdir
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Phase select on the training queries, then the shipped job's recipe with the choice
    (`crossfit.fit_cross_fitted`: final model on every training query, K cross-fit fold models, the
    calibrator on their aligned out-of-fold scores), then a bundle round trip and the test queries."""
    selection = select_cotrr(cfg, spec, train, s, thr) if s.select else None
    cfg_final = cfg if selection is None else chosen_config(cfg, selection)
    data = all_queries_data(cfg_final, spec, train, file_fingerprint(data_path))
    cf = fit_cross_fitted(cfg_final, data, lambda c, d: train_in_process(c, d, select="last"))
    res = cf.result
    unaligned = fit_oof_calibrator(res.oof_logits, res.lists, cfg_final)
    bundle_dir = Bundle.save(
        Path(workdir) / "bundle",
        model=cf.model,
        spec=spec,
        normalizer=data.normalizer,
        calibrator=cf.calibrator,
        relevance_threshold=thr,
        metrics={"bench": "quality_bench", "epochs": cfg_final.optim.max_epochs},
        train_config=cfg_final.model_dump(mode="json"),
        data_fingerprint=file_fingerprint(data_path),
    )
    bundle = Bundle.load(bundle_dir)
    scores = bundle.score(test)
    oof = per_query(res.lists, res.calibrated_logits, thr)["ndcg@10"]
    return scores, {
        "epochs": cfg_final.optim.max_epochs,
        "variant": None if selection is None else selection["chosen"]["name"],
        "inner_ndcg@10": None if selection is None else selection["chosen"]["inner_ndcg@10"],
        "selection": selection,
        "oof_ndcg@10": float(oof.mean()) if oof.size else None,
        "calibrator_rows": int(cf.calibrator.n_samples_),
        "alignment": [[round(x, 4), round(y, 4)] for x, y in res.alignment or []],
        "calibrator": bundle.calibrator,
        "calibrator_unaligned": unaligned,
        "train_base_rate": float(labels01(train, thr).mean()),
    }


# --------------------------------------------------------------------------- driver


TEST_FILE = "test-file"  # split name of --test FILE


def make_splits(
    lists: list[CandidateList], s: Settings, test_lists: list[CandidateList] | None = None
) -> dict[str, list[tuple[list[CandidateList], list[CandidateList]]]]:
    splits = {}
    for r in range(s.cv_repeats):
        # Repeat 1 keeps the original salt, so its folds are those of earlier single-repeat results.
        fold = assign_folds([cl.query_id for cl in lists], s.outer_folds, CV_SALT if r == 0 else f"{CV_SALT}-{r + 1}")
        splits[cv_name(s.outer_folds, r)] = [
            ([cl for cl, f in zip(lists, fold) if f != i], [cl for cl, f in zip(lists, fold) if f == i])
            for i in range(s.outer_folds)
        ]
    if s.fixed_split:
        fixed = split_by_query(lists, s.fixed_split, FIXED_SALT)
        splits["fixed"] = [(fixed["train"], fixed["test"])]
    if test_lists is not None:
        shared = sorted({cl.query_id for cl in lists} & {cl.query_id for cl in test_lists})
        if shared:
            raise ValueError(f"the test file shares {len(shared)} query ids with the training data, e.g. {shared[:3]}")
        splits[TEST_FILE] = [(list(lists), list(test_lists))]
    return splits


def cv_name(folds: int, repeat: int) -> str:
    return f"cv{folds}" + (f"-r{repeat + 1}" if repeat else "")


def repeated_name(folds: int, repeats: int) -> str:
    return f"cv{folds}x{repeats}"


def run_part(task: dict[str, Any]) -> dict[str, Any]:
    """One (train, test) split: every method, scored per query. Top-level so a process pool can run it."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    s: Settings = task["settings"]
    cfg = TrainConfig.model_validate(task["cfg"])
    train, test = task["train"], task["test"]
    thr = cfg.data.relevance_threshold
    spec = letor_spec(cfg.data.letor_num_features)
    (group,) = spec.candidate
    k = cfg.calibration.folds
    scores: dict[str, list[np.ndarray]] = {"upstream": [-np.arange(cl.window, dtype=np.float64) for cl in test]}
    info: dict[str, Any] = {"train_queries": len(train), "test_queries": len(test)}
    scores["ridge"], info["ridge"] = ridge_method(train, test, spec, group, k, s, thr)
    scores["lambdamart_fixed"], _ = lgb_fixed_method(train, test, group, s)
    scores["lambdamart_cv"], info["lambdamart_cv"] = lgb_cv_method(train, test, group, k, s, thr)
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as work:
        scores[OURS], ours = cotrr_method(cfg, spec, train, test, s, thr, task["data_path"], work)
    calibrator = ours.pop("calibrator")
    unaligned = ours.pop("calibrator_unaligned")
    info[OURS] = ours
    values = {m: per_query(test, scores[m], thr) for m in METHODS}
    used = ranking_report([(np.zeros(len(cl)), cl.labels) for cl in test], relevant_threshold=thr)["used_index"]
    # The per-query path is evaluate_lists' own: check it on this part (model and upstream variants).
    rep = (
        evaluate_lists(test, scores[OURS], calibrator, relevance_threshold=thr, n_boot=100)
        if values[OURS]["mrr"].size
        else None
    )
    for metric in RANKING_METRICS if rep else ():
        for ours_name, rep_name in ((OURS, "model"), ("upstream", "upstream")):
            v = values[ours_name][metric]
            assert v.size == rep["queries"] and abs(float(v.mean()) - rep[metric][rep_name]) < 1e-9, (metric, ours_name)
    z = np.concatenate([np.asarray(x, np.float64) for x in scores[OURS]])
    cal = {
        "calibrated": calibrator.predict(z),
        "unaligned": unaligned.predict(z),
        "raw": sigmoid(z),
        "base_rate": np.full(z.size, ours["train_base_rate"]),
        "y": labels01(test, thr),
    }
    info["ndcg@10"] = {m: float(v["ndcg@10"].mean()) if v["ndcg@10"].size else None for m, v in values.items()}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return {"values": values, "query_ids": [test[i].query_id for i in used], "cal": cal, "info": info}


CURVES = {"raw sigmoid": "raw", "cross-fit isotonic": "calibrated", "base rate": "base_rate"}  # reliability diagram


def run_bench(
    data_path: str | Path,
    *,
    config: str | Path = REPO / "configs" / "mslr.yaml",
    settings: Settings | None = None,
    overrides: list[str] | None = None,
    png: str | Path | None = None,
    jobs: int = 1,
    test_path: str | Path | None = None,
    say=print,
) -> dict[str, Any]:
    """The recipe: read the lists, deal the splits, score every method on every part, pool, describe."""
    s = settings or Settings()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(config, [*s.model_overrides, *(overrides or []), f"data.path={data_path}"])
    if cfg.data.format != "letor":
        raise ValueError("the quality bench reads LETOR files (data.format: letor)")
    lists, test_lists = read_lists(cfg, s, data_path, test_path, jobs, say)
    splits = make_splits(lists, s, test_lists)
    done = run_parts(part_tasks(cfg, s, data_path, splits), splits, jobs, say)
    results, cv_parts = pool_splits(splits, done, s)
    if png is not None:
        plot_reliability(results, cv_parts, s, cfg.data.relevance_threshold, png)
    results.update(describe_run(cfg, s, data_path, test_path, lists, config, overrides, png, jobs))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    return results


def read_lists(
    cfg: TrainConfig, s: Settings, data_path: str | Path, test_path: str | Path | None, jobs: int, say
) -> tuple[list[CandidateList], list[CandidateList] | None]:
    d = cfg.data

    def read(path: str | Path) -> list[CandidateList]:
        ls = read_letor(
            path, num_features=d.letor_num_features, upstream_feature=d.letor_upstream_feature, window=cfg.model.top_m
        )
        return ls if s.max_queries is None else ls[: s.max_queries]

    lists = read(data_path)
    test_lists = None if test_path is None else read(test_path)
    say(
        f"{data_path}: {len(lists)} queries, {sum(map(len, lists))} rows, lists {min(map(len, lists))}-"
        f"{max(map(len, lists))}, window top_m={cfg.model.top_m}; {jobs} process(es)"
    )
    if test_lists is not None:
        say(f"{test_path}: {len(test_lists)} held-out queries, {sum(map(len, test_lists))} rows")
    return lists, test_lists


def part_tasks(cfg: TrainConfig, s: Settings, data_path: str | Path, splits: dict) -> list[dict[str, Any]]:
    """One task per (split, part): what `run_part` needs, picklable for a process pool."""
    return [
        {
            "cfg": cfg.model_dump(mode="json"),
            "settings": s,
            "data_path": str(data_path),
            "train": tr,
            "test": te,
            "key": (name, i),
        }
        for name, parts in splits.items()
        for i, (tr, te) in enumerate(parts)
    ]


def run_parts(tasks: list[dict[str, Any]], splits: dict, jobs: int, say) -> dict[tuple[str, int], dict[str, Any]]:
    """`run_part` on every task, in this process or `jobs` spawned ones; each part logged as it ends."""
    done: dict[tuple[str, int], dict[str, Any]] = {}

    def log(key: tuple[str, int], r: dict[str, Any]) -> None:
        info = r["info"]
        say(
            f"  {key[0]} part {key[1] + 1}/{len(splits[key[0]])}: {info['train_queries']} train / {info['test_queries']} test "
            f"queries, {info[OURS]['variant'] or 'config'} x {info[OURS]['epochs']} epochs, ridge alpha {info['ridge']['alpha']:g}, LambdaMART "
            f"{info['lambdamart_cv']['num_leaves']} leaves x {info['lambdamart_cv']['n_estimators']} trees; nDCG@10 "
            + ", ".join(f"{m} {v:.3f}" for m, v in info["ndcg@10"].items() if v is not None)
            + f" ({info['seconds']:.0f} s)"
        )

    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_part, t): t["key"] for t in tasks}
            for f in as_completed(futures):
                done[futures[f]] = f.result()
                log(futures[f], done[futures[f]])
    else:
        for t in tasks:
            done[t["key"]] = run_part(t)
            log(t["key"], done[t["key"]])
    return done


def pool_splits(splits: dict, done: dict, s: Settings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each split's parts pooled, and the repeated-CV summary first when there are repeats."""
    results: dict[str, Any] = {"splits": {}}
    cv_parts = []  # every CV part of every repeat
    for split_name, parts in splits.items():
        rs = [done[(split_name, i)] for i in range(len(parts))]
        if split_name.startswith("cv"):
            cv_parts += rs
        results["splits"][split_name] = split_result(rs, s.n_boot)
        results["splits"][split_name]["skipped"] = (
            sum(len(t) for _, t in parts) - results["splits"][split_name]["queries"]
        )
    if s.cv_repeats > 1:
        rep = repeated_result(cv_parts, s)
        rep["skipped"] = results["splits"][cv_name(s.outer_folds, 0)]["skipped"]  # the skip rule depends on labels only
        results["splits"] = {repeated_name(s.outer_folds, s.cv_repeats): rep, **results["splits"]}
    return results, cv_parts


def plot_reliability(results: dict, cv_parts: list[dict[str, Any]], s: Settings, thr: float, png: str | Path) -> None:
    from cotrr_ray.training.plots import reliability_diagram

    cv_key = repeated_name(s.outer_folds, s.cv_repeats) if s.cv_repeats > 1 else cv_name(s.outer_folds, 0)
    cv = results["splits"][cv_key]
    cal = pooled_cal(cv_parts)
    calib_metrics = {name: cv["calibration"][CALIBRATION_KEYS[key]] for name, key in CURVES.items()}
    reliability_diagram(
        {name: (cal[key], cal["y"]) for name, key in CURVES.items()},
        png,
        title=f"cotrr-ray, {s.outer_folds}-fold CV x {s.cv_repeats}, test queries, P(label >= {thr:g})",
        metrics=calib_metrics,
    )


def describe_run(cfg, s, data_path, test_path, lists, config, overrides, png, jobs) -> dict[str, Any]:
    """Data, settings and machine of the run (the result's fields next to "splits")."""
    return {
        "data": str(data_path),
        "data_fingerprint": file_fingerprint(data_path),
        "test_data": None if test_path is None else str(test_path),
        "test_data_fingerprint": None if test_path is None else file_fingerprint(test_path),
        "queries": len(lists),
        "rows": int(sum(map(len, lists))),
        "relevance_threshold": cfg.data.relevance_threshold,
        "config": str(config),
        "overrides": [*s.model_overrides, *(overrides or [])],
        "train_config": cfg.model_dump(mode="json"),
        "settings": {k2: v for k2, v in asdict(s).items()},
        "lambdamart_fixed_params": {"objective": "lambdarank", **s.lgb_fixed},
        "lambdamart_grid": lgb_grid(s),
        "reliability_png": None if png is None else str(png),
        "machine": {
            **basic_machine(),
            "processes": jobs,
            "torch_threads": torch.get_num_threads(),
            "load_avg_end": list(os.getloadavg()),
            "torch": torch.__version__,
        },
    }


def _choices(r: dict[str, Any]) -> str:
    """Per part: cotrr-ray's variant x epochs and its inner-CV nDCG@10 (what chose it)."""
    out = []
    for p in r["per_part"]:
        o = p[OURS]
        inner = "" if o["inner_ndcg@10"] is None else f" (inner {o['inner_ndcg@10']:.3f})"
        out.append(f"[{o['variant'] or 'config'}] x {o['epochs']}{inner}")
    return "; ".join(out)


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"quality bench: {res['data']} ({res['queries']} queries, {res['rows']} rows), "
        f"relevance = label >= {res['relevance_threshold']:g}, wall {res['wall_s']:.0f} s"
    ]
    s = res["settings"]
    repeated = s["cv_repeats"] > 1
    rep_name = repeated_name(s["outer_folds"], s["cv_repeats"])
    for split, r in res["splits"].items():
        if repeated and split.startswith("cv") and split != rep_name:
            if split == cv_name(s["outer_folds"], 0):
                lines += ["", "each repeat alone (nDCG@10, pooled over its folds):"]
            row = ", ".join(f"{m} {e['ndcg@10']:.4f}" for m, e in r["methods"].items())
            lines.append(f"  {split}: {row}; {OURS} choices {_choices(r)}")
            continue
        if split == rep_name:
            title = (
                f"{split}: grouped {s['outer_folds']}-fold CV by query, repeated {r['repeats']} times with different "
                f"folds; each query's metrics averaged over the repeats"
            )
        elif split.startswith("cv"):
            title = f"{split}: grouped {split[2:]}-fold CV by query, pooled over folds"
        elif split == TEST_FILE:
            title = f"held-out file {res['test_data']}: trained on all {res['queries']} queries of the data"
        else:
            title = "fixed split: 70/30 by query-id hash"
        lines += ["", f"{title}; {r['queries']} queries with a relevant candidate ({r['skipped']} skipped)"]
        lines.append(
            f"{'method':<24}{'nDCG@1':>8}{'nDCG@5':>8}{'nDCG@10':>8}{'MRR':>8}   {'nDCG@10 95% CI':<17}"
            f" {OURS} - method, nDCG@10 [95% CI] (wins/losses)"
        )
        for m in METHODS:
            e = r["methods"][m]
            lo, hi = e["ndcg@10_ci"]
            row = f"{LABELS[m]:<24}" + "".join(f"{e[k]:>8.4f}" for k in RANKING_METRICS) + f"   [{lo:.3f}, {hi:.3f}]"
            p = r["paired"].get(f"{OURS} - {m}")
            if p:
                q = p["ndcg@10"]
                row += f"    {q['mean']:+.4f} [{q['ci'][0]:+.4f}, {q['ci'][1]:+.4f}] ({q['wins']}/{q['losses']})"
            lines.append(row)
        c = r["calibration"]
        lines.append(
            f"calibration of {OURS} P(label >= {res['relevance_threshold']:g}) on test queries "
            f"(n = {c['raw_sigmoid']['n']} rows, base rate {c['raw_sigmoid']['base_rate']:.3f}):"
        )
        lines.append(f"{'':<24}{'ECE-width':>10}{'ECE-mass':>10}{'Brier':>8}{'logloss':>9}")
        for name in ("cross_fit_isotonic", "cross_fit_unaligned", "raw_sigmoid", "base_rate"):
            x = c[name]
            lines.append(
                f"{name:<24}{x['ece_equal_width']:>10.4f}{x['ece_equal_mass']:>10.4f}{x['brier']:>8.4f}{x['log_loss']:>9.4f}"
            )
        if "per_part" in r:
            lines.append(f"{OURS} choices by inner CV, per part: {_choices(r)}; compute {r['seconds']:.0f} s")
        else:
            lines.append(f"compute {r['seconds']:.0f} s")
    lines.append("")
    lines.append(f"LambdaMART fixed: {json.dumps(res['lambdamart_fixed_params'])}")
    lines.append(
        f"LambdaMART CV grid: {len(res['lambdamart_grid'])} settings x trees {res['settings']['lgb_rounds']}; "
        f"cotrr-ray: epochs 1..{s['max_epochs']}; ridge alphas {s['ridge_alphas']}"
    )
    m = res["machine"]
    lines.append(
        f"machine: {m['platform']}, {m['cpus']} CPUs, {m['processes']} process(es) x {m['torch_threads']} torch thread, "
        f"load avg at end {[round(x, 1) for x in m['load_avg_end']]}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mslr-web10k-sample" / "train.txt"))
    p.add_argument("--config", default=str(REPO / "configs" / "mslr.yaml"))
    p.add_argument("--quick", action="store_true", help="smoke run: 12 queries, tiny model, 3 folds, 3 epochs")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="reliability diagram (default: next to --json, .png)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="TrainConfig override key.path=value")
    p.add_argument("--jobs", type=int, default=None, help="processes, one split each (default: 2, --quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="CV repeats with different folds (default: 3, --quick: 2)")
    p.add_argument("--test", default=None, help="LETOR file of held-out queries: train on all of --data, score these")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed 70/30 split")
    p.add_argument(
        "--no-select",
        action="store_true",
        help="cotrr-ray: train the config exactly as given (no variant or epoch choice inside the splits)",
    )
    args = p.parse_args(argv)
    settings = quick_settings() if args.quick else Settings()
    if args.no_fixed:
        settings.fixed_split = None
    if args.no_select:
        settings.select = False
    if args.repeats is not None:
        if args.repeats < 1:
            p.error("--repeats must be >= 1")
        settings.cv_repeats = args.repeats
    png = args.png or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else None)
    jobs = args.jobs or (1 if args.quick else 2)
    res = jsonable(
        run_bench(
            args.data,
            config=args.config,
            settings=settings,
            overrides=args.overrides,
            png=png,
            jobs=jobs,
            test_path=args.test,
        )
    )
    print(format_table(res), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
