"""Cross-fitted calibration (cotrr_ray.training.crossfit): Ray-free, on a tiny synthetic LETOR file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import FeatureNormalizer, labels01
from cotrr_ray.core.metrics import ece, sigmoid
from cotrr_ray.data.readers import letor_spec, read_letor
from cotrr_ray.data.splits import split_of
from cotrr_ray.training.checkpoints import model_from_state
from cotrr_ray.training.crossfit import (
    CrossFitResult,
    _fold_config,
    assign_folds,
    cross_fit,
    cross_fit_calibrator,
    fold_run_base,
    moment_alignment,
    train_in_process,
)
from cotrr_ray.training.prepare import prepare_splits, window_logits

N_FEATURES = 8


def write_letor(path: Path, *, queries: int, seed: int = 0) -> Path:
    """Heavy-tailed features; relevance driven by features 1 and 2 (plus noise), labels 0..3."""
    rng = np.random.default_rng(seed)
    lines = []
    for q in range(queries):
        n = int(rng.integers(12, 25))
        x = rng.lognormal(0.0, 1.0, size=(n, N_FEATURES))
        u = np.log(x[:, 0]) + 0.5 * np.log(x[:, 1]) + 0.4 * rng.standard_normal(n) + rng.normal(0, 0.5)
        labels = np.digitize(u, [0.3, 1.2, 2.0])
        for i in range(n):
            feats = " ".join(f"{j + 1}:{x[i, j]:.5f}" for j in range(N_FEATURES))
            lines.append(f"{labels[i]} qid:{1000 + q} {feats}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_cfg(tmp_path: Path, epochs: int = 4, **optim) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "output": str(tmp_path / "bundle"),
            "data": {"format": "letor", "letor_num_features": N_FEATURES, "letor_upstream_feature": 3},
            "model": {"top_m": 32, "d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0},
            "optim": {
                "lr": 3e-3,
                "batch_size": 8,
                "max_epochs": epochs,
                "patience": epochs,
                "amp": "none",
                "warmup_frac": 0.0,
                "min_lr_ratio": 1.0,
                **optim,
            },
            "scaling": {"num_workers": 0},
            "calibration": {"method": "cross_fit", "folds": 3, "min_samples": 10},
        }
    )


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    path = write_letor(tmp_path_factory.mktemp("letor") / "train.txt", queries=36)
    return read_letor(path, num_features=N_FEATURES, upstream_feature=3, window=32)


def _last(cfg, data):
    return train_in_process(cfg, data, select="last")


def test_assign_folds_balanced_deterministic_and_order_free():
    ids = [f"q{i}" for i in range(23)]
    a = assign_folds(ids, 5)
    assert sorted(np.bincount(a, minlength=5)) == [4, 4, 5, 5, 5]
    b = assign_folds(ids[::-1], 5)[::-1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, assign_folds(ids, 5, salt="other"))
    with pytest.raises(ValueError):
        assign_folds(ids[:3], 5)


def test_prepare_splits_fits_normalizer_on_train_only(lists, tmp_path):
    cfg = tiny_cfg(tmp_path)
    spec = letor_spec(N_FEATURES)
    data = prepare_splits(cfg, spec, {"train": lists[:20], "validation": lists[20:24]})
    ref = FeatureNormalizer(spec).fit(lists[:20])
    for key, (mean, scale) in ref.stats_.items():
        np.testing.assert_array_equal(data.normalizer.stats_[key][0], mean)
        np.testing.assert_array_equal(data.normalizer.stats_[key][1], scale)
    assert data.padded["train"].mask.shape == (20, 32)


def test_oof_scores_never_come_from_a_model_that_saw_the_query(lists, tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    pool, validation = lists[:30], lists[30:]
    seen: dict[int, set[str]] = {}

    def spy(c: TrainConfig, data):
        i = int(c.scaling.run_name.rsplit("fold", 1)[1])
        seen[i] = {cl.query_id for cl in data.lists["train"]}
        assert not seen[i] & {cl.query_id for cl in data.lists["validation"]}
        return _last(c, data)

    res = cross_fit(cfg, letor_spec(N_FEATURES), pool, validation, spy)
    assert isinstance(res, CrossFitResult) and sorted(seen) == [0, 1, 2]
    all_ids = {cl.query_id for cl in pool}
    for cl, f in zip(res.lists, res.fold):
        assert cl.query_id not in seen[f]  # the scoring model never trained on this query...
        assert seen[f] == {c.query_id for c, g in zip(res.lists, res.fold) if g != f}  # ...but on all other folds
    assert set().union(*seen.values()) == all_ids
    assert [len(z) for z in res.oof_logits] == [cl.window for cl in pool]
    assert res.calibrator.n_samples_ == sum(cl.window for cl in pool)
    assert res.info()["folds"] == 3 and res.info()["queries"] == 30


def test_cross_fit_refuses_validation_inside_the_pool(lists, tmp_path):
    with pytest.raises(ValueError, match="pool"):
        cross_fit(tiny_cfg(tmp_path), letor_spec(N_FEATURES), lists[:30], lists[25:], _last)


def test_fold_runs_get_distinct_names(tmp_path):
    cfg = tiny_cfg(tmp_path)
    base = fold_run_base(cfg)
    names = {_fold_config(cfg, i, base).scaling.run_name for i in range(3)}
    assert len(names) == 3 and all(n.startswith(base) for n in names)
    assert fold_run_base(cfg) != base  # default names are fresh: a later job never resumes old folds
    named = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"run_name": "job"})})
    assert _fold_config(named, 1).scaling.run_name == "job-fold1"  # fixed names resume with the job


def test_calibrator_is_monotone_and_reduces_ece_on_unseen_queries(lists, tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=6)
    spec = letor_spec(N_FEATURES)
    train, validation, test = lists[:24], lists[24:28], lists[28:]
    data = prepare_splits(cfg, spec, {"train": train, "validation": validation, "test": test})
    final = model_from_state(_last(cfg, data), data.model_config)
    calibrator, info = cross_fit_calibrator(cfg, data, _last, final_model=final)
    assert info["method"] == "cross_fit" and info["queries"] == 24 and len(info["alignment"]) == 3

    grid = np.linspace(-20, 20, 2001)
    assert np.all(np.diff(calibrator.predict(grid)) >= 0)
    assert np.all(np.diff(calibrator.y_thresholds_) >= 0)

    z = np.concatenate(window_logits(final, test, data))
    y = labels01(test, cfg.data.relevance_threshold)
    raw, cal = ece(sigmoid(z), y), ece(calibrator.predict(z), y)
    assert cal < raw and cal < 0.12, (raw, cal)


def test_moment_alignment_maps_onto_the_final_models_scale(lists, tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=2)
    spec = letor_spec(N_FEATURES)
    data = prepare_splits(cfg, spec, {"train": lists[:20], "validation": lists[20:24]})
    model = model_from_state(_last(cfg, data), data.model_config)
    a, b = moment_alignment(model, data, model, data, lists[:20])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.0, abs=1e-6)
    other = prepare_splits(cfg, spec, {"train": lists[:12], "validation": lists[20:24]})
    small = model_from_state(_last(cfg, other), other.model_config)
    a, b = moment_alignment(small, other, model, data, lists[:12])
    zs = np.concatenate(window_logits(small, lists[:12], other))
    zF = np.concatenate(window_logits(model, lists[:12], data))
    assert (a * zs + b).mean() == pytest.approx(zF.mean(), abs=1e-5)
    assert (a * zs + b).std() == pytest.approx(zF.std(), rel=1e-4)


def test_inner_cv_fold_models_equal_cross_fit_models_with_constant_lr(lists, tmp_path):
    """The bench reuses inner-CV fold models (epoch E of a longer run) as cross-fit models."""
    spec = letor_spec(N_FEATURES)
    pool = lists[:30]
    epochs = 2
    res = cross_fit(tiny_cfg(tmp_path, epochs=epochs), spec, pool, None, _last, salt="cotrr-crossfit")
    long_cfg = tiny_cfg(tmp_path, epochs=epochs + 2)
    for i in range(3):
        held = [cl for cl, f in zip(pool, res.fold) if f == i]
        rest = [cl for cl, f in zip(pool, res.fold) if f != i]
        data = prepare_splits(long_cfg, spec, {"train": rest, "validation": held})
        at_epoch: dict[int, list[np.ndarray]] = {}

        def on_epoch(epoch, state, data=data, held=held, at_epoch=at_epoch):
            at_epoch[epoch] = window_logits(model_from_state(state, data.model_config), held, data)

        train_in_process(long_cfg, data, select="last", on_epoch=on_epoch)
        expected = [z for z, f in zip(res.oof_logits, res.fold) if f == i]
        for a, b in zip(at_epoch[epochs - 1], expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_train_in_process_select_best_and_last(lists, tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=3)
    data = prepare_splits(cfg, letor_spec(N_FEATURES), {"train": lists[:20], "validation": lists[20:26]})
    last = train_in_process(cfg, data, select="last")
    best = train_in_process(cfg, data, select="best")
    assert last["epoch"] == 2 and len(last["history"]) == 3
    vals = [h["val_window_ndcg@10"] for h in best["history"]]
    assert best["epoch"] == int(np.argmax(vals))
    with pytest.raises(ValueError):
        train_in_process(cfg, data, select="median")


@pytest.mark.integration
def test_job_run_cross_fit_in_ray_train_local_mode(tmp_path, local_ray):
    """train_job.py's path end to end: Ray Train V2 local mode (num_workers=0), cross-fitted calibrator."""
    from cotrr_ray.bundles.bundle import Bundle
    from cotrr_ray.training.job import run

    data = write_letor(tmp_path / "train.txt", queries=30)
    cfg = tiny_cfg(tmp_path, epochs=2).model_dump(mode="json")
    cfg["data"].update(path=str(data), splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    cfg["scaling"]["storage_path"] = str(tmp_path / "ray_results")
    cfg["bootstrap_samples"] = 100
    out = run(TrainConfig.model_validate(cfg), say=lambda _: None).local_dir()
    bundle = Bundle.load(out)
    fit_info = json.loads((Path(out) / "metrics.json").read_text())["calibration_fit"]
    assert fit_info["method"] == "cross_fit" and fit_info["folds"] == 3 and len(fit_info["alignment"]) == 3
    lists = read_letor(data, num_features=N_FEATURES, upstream_feature=3, window=32)
    train_rows = sum(
        cl.window for cl in lists if split_of(cl.query_id, cfg["data"]["splits"], cfg["data"]["split_salt"]) == "train"
    )
    assert fit_info["rows"] == bundle.calibrator.n_samples_ == train_rows


# --------------------------------------------------------------------------- cross-fitted evaluation


def cv_cfg(tmp_path: Path, epochs: int = 2) -> TrainConfig:
    raw = tiny_cfg(tmp_path, epochs=epochs).model_dump(mode="json")
    raw["data"]["splits"] = {"train": 1.0}
    raw["optim"]["select"] = "last"
    raw["evaluation"] = {"method": "cross_fit"}
    raw["bootstrap_samples"] = 200
    return TrainConfig.model_validate(raw)


def test_oof_probabilities_come_from_a_calibrator_that_never_saw_the_fold(lists):
    from cotrr_ray.core.calibration import IsotonicCalibrator
    from cotrr_ray.training.crossfit import oof_probabilities

    pool = lists[:9]
    fold = np.array([i % 3 for i in range(9)])
    # Fold 0's rows are all relevant and score high; the other folds' rows with the same scores are
    # not relevant. An in-sample calibrator would give fold 0 a high probability; one fitted on
    # folds 1-2 only must give it 0.
    relabelled, logits = [], []
    for i, cl in enumerate(pool):
        y = np.full(len(cl), 3.0 if fold[i] == 0 else 0.0, np.float32)
        relabelled.append(type(cl)(**{**cl.__dict__, "labels": y}))
        logits.append(np.linspace(5.0, 6.0, cl.window))
    relabelled[1].labels[:] = 3.0  # folds 1-2 need both classes: one relevant list, scored above all
    logits[1] = np.linspace(7.0, 8.0, relabelled[1].window)
    cal = IsotonicCalibrator(min_samples=1).fit(np.concatenate(logits), labels01(relabelled, 1.0))
    res = CrossFitResult(relabelled, fold, logits, [0, 0, 0], None, cal)
    probs = oof_probabilities(res, TrainConfig.model_validate({}))
    assert [len(p) for p in probs] == [cl.window for cl in relabelled]
    for i in np.flatnonzero(fold == 0):
        assert cal.predict(logits[i]).mean() > 0.2  # what the in-sample calibrator would claim
        np.testing.assert_array_equal(probs[i], 0.0)  # ...and what the other folds support


def test_fit_cross_fitted_trains_the_final_model_on_every_query_and_reports_oof(lists, tmp_path):
    from cotrr_ray.core.metrics import calibration_report
    from cotrr_ray.training.crossfit import fit_cross_fitted, oof_probabilities
    from cotrr_ray.training.prepare import all_queries_data

    cfg = cv_cfg(tmp_path)
    pool = lists[:24]
    calls: list[set[str]] = []

    def spy(c: TrainConfig, data):
        calls.append({cl.query_id for cl in data.lists["train"]})
        return _last(c, data)

    data = all_queries_data(cfg, letor_spec(N_FEATURES), pool, "sha256:x")
    cf = fit_cross_fitted(cfg, data, spy)
    ids = {cl.query_id for cl in pool}
    assert calls[0] == ids  # the final model: every query, nothing held out
    assert len(calls) == 1 + 3 and all(len(ids - c) in (8,) for c in calls[1:])  # 3 fold models, 8 out each
    assert set().union(*(ids - c for c in calls[1:])) == ids  # every query held out once
    assert cf.state["epoch"] == cfg.optim.max_epochs - 1  # fixed epochs: the last one
    assert cf.calibrator.n_samples_ == sum(cl.window for cl in pool)

    report = cf.report(cfg)
    assert report["queries"] + report["skipped"] == len(pool)  # a per-query estimate over every query
    assert "cross-fitted" in report["estimate"]
    lo, hi = report["ndcg@10"]["model_ci"]
    assert lo <= report["ndcg@10"]["model"] <= hi and hi - lo > 0  # an interval, not a point
    # The report's ranking metrics are those of the out-of-fold scores, its calibration that of
    # the other-folds calibrators (not the shipped, in-sample one).
    from cotrr_ray.training.evaluate import evaluate_lists

    oof = evaluate_lists(pool, cf.result.oof_logits, None, relevance_threshold=1.0, n_boot=200)
    final = evaluate_lists(pool, window_logits(cf.model, pool, data), None, relevance_threshold=1.0, n_boot=200)
    assert report["ndcg@10"]["model"] == pytest.approx(oof["ndcg@10"]["model"])  # per-fold alignment keeps order
    assert report["ndcg@10"]["model"] != pytest.approx(final["ndcg@10"]["model"])  # not the in-sample model
    y = labels01(pool, 1.0)
    honest = calibration_report(np.concatenate(oof_probabilities(cf.result, cfg)), y)
    in_sample = calibration_report(cf.calibrator.predict(np.concatenate(cf.result.calibrated_logits)), y)
    assert report["calibration"]["calibrated"] == honest
    assert report["calibration"]["calibrated"]["brier"] > in_sample["brier"]  # in-sample flatters


def test_cross_fitted_evaluation_config_rules(tmp_path):
    cfg = cv_cfg(tmp_path)
    assert cfg.evaluation.method == "cross_fit" and cfg.data.splits == {"train": 1.0}
    raw = cfg.model_dump(mode="json")
    for key, value, message in (
        ("data", {**raw["data"], "splits": {"train": 0.9, "validation": 0.05, "test": 0.05}}, "data.splits"),
        ("calibration", {**raw["calibration"], "method": "holdout"}, "calibration.method"),
        ("optim", {**raw["optim"], "select": "best_val"}, "optim.select"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.model_validate({**raw, key: value})
    with pytest.raises(ValueError, match="holds nothing out"):
        TrainConfig.model_validate({**raw, "evaluation": {"method": "test_split"}})


def test_prepare_data_under_cross_fitted_evaluation_keeps_every_query(tmp_path):
    from cotrr_ray.training.prepare import prepare_data

    path = write_letor(tmp_path / "t.txt", queries=11)
    data = prepare_data(cv_cfg(tmp_path), path)
    assert len(data.lists["train"]) == 11 and data.lists["validation"] == data.lists["train"]
    assert data.data_fingerprint and data.data_fingerprint.startswith("sha256:")
