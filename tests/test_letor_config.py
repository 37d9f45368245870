"""configs/letor.yaml, the generic LETOR config, on a LETOR file unlike MSLR (tests/data/letor-12f-sparse.txt:
12 features, sparse rows, string query ids, rows in upstream order, no BM25 column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cotrr_ray.config import TrainConfig
from cotrr_ray.data.readers import DataError, read_letor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "letor.yaml"
FIXTURE = ROOT / "tests" / "data" / "letor-12f-sparse.txt"
# Only to keep the test short: the model and epochs, never the data settings under test.
FAST = ["model.d_model=16", "model.n_heads=2", "optim.max_epochs=2", "optim.patience=2", "calibration.min_samples=10"]


def _fixture_rows() -> dict[str, list[tuple[float, dict[int, float]]]]:
    """The fixture parsed by hand: qid -> rows in file order, (label, {index: value})."""
    out: dict[str, list[tuple[float, dict[int, float]]]] = {}
    for line in FIXTURE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tok = line.split()
        feats = {int(i): float(v) for i, v in (t.split(":") for t in tok[2:])}
        out.setdefault(tok[1][4:], []).append((float(tok[0]), feats))
    return out


def test_letor_config_states_only_what_differs_from_mslr():
    own = yaml.safe_load(CONFIG.read_text())
    assert own["base"] == "mslr.yaml"
    assert set(own) == {"base", "output", "data"}  # model, optim, scaling, evaluation: mslr.yaml's recipe
    assert set(own["data"]) == {"path", "letor_num_features", "letor_upstream_feature"}
    cfg, mslr = TrainConfig.from_yaml(CONFIG), TrainConfig.from_yaml(ROOT / "configs" / "mslr.yaml")
    assert (cfg.data.letor_num_features, cfg.data.letor_upstream_feature) == (12, "file_order")
    assert (mslr.data.letor_num_features, mslr.data.letor_upstream_feature) == (136, 110)
    for section in ("model", "optim", "scaling", "calibration", "evaluation"):
        assert getattr(cfg, section) == getattr(mslr, section), section
    assert cfg.data.splits == mslr.data.splits == {"train": 1.0}


def test_base_chain_merges_sections_and_refuses_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\noptim: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("optim: {lr: 0.1, batch_size: 3}\nmodel: {d_model: 24}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "a.yaml", ["model.d_model=32"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.model.d_model) == (0.5, 3, 32)
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="circular"):
        TrainConfig.from_yaml(tmp_path / "a.yaml")


def test_reader_keeps_ids_file_order_and_sparse_zeros():
    rows = _fixture_rows()
    lists = read_letor(FIXTURE, num_features=12, upstream_feature="file_order")
    assert [cl.query_id for cl in lists] == list(rows)  # the file's own (string) ids, in file order
    assert any(not q.isdigit() for q in rows)
    for cl in lists:
        expected = rows[cl.query_id]
        np.testing.assert_array_equal(cl.labels, [r[0] for r in expected])  # file order kept...
        np.testing.assert_array_equal(cl.upstream, -np.arange(len(expected)))  # ...as the upstream order
        x = cl.features["letor"]
        assert x.shape == (len(expected), 12)
        for i, (_, feats) in enumerate(expected):
            for j in range(1, 13):
                assert x[i, j - 1] == pytest.approx(feats.get(j, 0.0), rel=1e-6)  # absent -> 0
    assert sum((cl.features["letor"] == 0).sum() for cl in lists) > 100  # the fixture is sparse
    # A feature number as the upstream order sorts by it, descending.
    by5 = read_letor(FIXTURE, num_features=12, upstream_feature=5)[0]
    assert np.all(np.diff(by5.upstream) <= 0) and np.all(by5.features["letor"][:, 4] == by5.upstream)


def test_wrong_feature_count_and_upstream_feature_fail_with_the_field():
    with pytest.raises(DataError, match=r"letor-12f-sparse.txt:\d+: .*feature index 1[0-2] outside 1..9"):
        read_letor(FIXTURE, num_features=9, upstream_feature="file_order")
    with pytest.raises(ValueError, match="data.letor_upstream_feature must be in 1..12"):
        TrainConfig.from_yaml(CONFIG, ["data.letor_upstream_feature=110"])
    with pytest.raises(ValueError, match="letor_upstream_feature"):
        TrainConfig.from_yaml(CONFIG, ["data.letor_upstream_feature=bm25"])


def test_letor_config_trains_and_cross_fits_on_the_fixture():
    """The recipe train_job.py runs for this config (`fit_cross_fitted`), in-process (Ray-free)."""
    from cotrr_ray.training.crossfit import fit_cross_fitted, train_in_process
    from cotrr_ray.training.prepare import prepare_data

    cfg = TrainConfig.from_yaml(CONFIG, [*FAST, f"data.path={FIXTURE}"])
    data = prepare_data(cfg, cfg.data.path)
    assert data.model_config.candidate_groups == (("letor", 12),)
    assert len(data.lists["train"]) == 15
    cf = fit_cross_fitted(cfg, data, lambda c, d: train_in_process(c, d, select="last", ray_data=True))
    report = cf.report(cfg, n_boot=100)
    assert report["queries"] + report["skipped"] == 15
    assert cf.calibrator.n_samples_ == sum(len(cl) for cl in data.lists["train"])  # top_m 320 > every list
    assert json.loads(json.dumps(report)) == report


@pytest.mark.integration
def test_train_job_and_evaluate_cli_on_the_fixture(tmp_path, capsys, local_ray):
    """train_job.py's path (Ray Train local mode) with configs/letor.yaml, then `cotrr_ray.evaluate` on the
    file; and the job's model is the in-process recipe's (one recipe: the bench trains the same way)."""
    from cotrr_ray.bundles.bundle import Bundle
    from cotrr_ray.training.crossfit import fit_cross_fitted, train_in_process
    from cotrr_ray.training.evaluate import main as evaluate_main
    from cotrr_ray.training.job import run
    from cotrr_ray.training.prepare import prepare_data

    cfg = TrainConfig.from_yaml(
        CONFIG,
        [
            *FAST,
            f"data.path={FIXTURE}",
            f"output={tmp_path / 'reg' / 'letor'}",
            f"scaling.storage_path={tmp_path / 'runs'}",
        ],
    )
    out = run(cfg, say=lambda _: None).local_dir()
    bundle = Bundle.load(out)
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    assert metrics["evaluation"] == "cross_fit" and metrics["splits"] == {"train": 15}
    assert metrics["cross_fit"]["queries"] + metrics["cross_fit"]["skipped"] == 15
    assert set(metrics["headline"]) == {"cv_ndcg@10_model", "cv_ndcg@10_upstream", "cv_ece_calibrated"}
    assert metrics["calibration_fit"]["folds"] == 5

    lists = read_letor(FIXTURE, num_features=12, upstream_feature="file_order", window=bundle.top_m)
    data = prepare_data(cfg, FIXTURE)
    cf = fit_cross_fitted(cfg, data, lambda c, d: train_in_process(c, d, select="last", ray_data=True))
    from cotrr_ray.training.prepare import window_logits

    for a, b in zip(bundle.score(lists), window_logits(cf.model, lists, data), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(bundle.calibrator.x_thresholds_, cf.calibrator.x_thresholds_, atol=1e-5)

    with pytest.raises(SystemExit, match="cross-fitted out-of-fold report"):
        evaluate_main(["--bundle", str(out), "--data", str(FIXTURE), "--format", "letor"])
    evaluate_main(
        ["--bundle", str(out), "--data", str(FIXTURE), "--format", "letor", "--all-queries", "--bootstrap", "100"]
    )
    assert "ALL queries" in capsys.readouterr().out


def test_parquet_conversion_keeps_the_file_order_upstream(tmp_path):
    from cotrr_ray.data.convert import main as convert_main
    from cotrr_ray.data.parquet import read_parquet_records
    from cotrr_ray.data.readers import letor_spec

    out = tmp_path / "pq"
    args = ["convert", "--input", str(FIXTURE), "--format", "letor", "--output", str(out), "--letor-num-features", "12"]
    assert convert_main([*args, "--letor-upstream-feature", "file_order"]) == 0
    got = read_parquet_records(out, letor_spec(12), window=None)
    want = read_letor(FIXTURE, num_features=12, upstream_feature="file_order")
    assert [cl.query_id for cl in got] == [cl.query_id for cl in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.upstream, b.upstream)
        np.testing.assert_array_equal(a.features["letor"], b.features["letor"])
