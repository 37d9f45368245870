"""Smoke test of bench/quality_bench.py --quick on a tiny synthetic LETOR file (Ray-free, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # an optional benchmark dependency; its wheel needs the system's libgomp (OSError without it)
    import lightgbm  # noqa: F401
except (ImportError, OSError) as e:
    pytest.skip(f"lightgbm unavailable: {e}", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # the benches' toolkit, `kit`

from kit import letor as kit_letor  # noqa: E402

N_FEATURES = 8


def _load_bench(name: str = "quality_bench"):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _write_letor(path: Path, queries: int = 14, seed: int = 0, first_qid: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for q in range(queries):
        n = int(rng.integers(10, 20))
        x = rng.lognormal(0.0, 1.0, size=(n, N_FEATURES))
        u = np.log(x[:, 0]) + 0.5 * np.log(x[:, 1]) + 0.4 * rng.standard_normal(n)
        labels = np.digitize(u, [0.3, 1.2, 2.0])
        labels[0] = max(labels[0], 1)  # every query has a relevant candidate
        for i in range(n):
            lines.append(
                f"{labels[i]} qid:{first_qid + q} " + " ".join(f"{j + 1}:{x[i, j]:.4f}" for j in range(N_FEATURES))
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_quick_bench_writes_results_of_the_documented_shape(tmp_path):
    bench = _load_bench()
    data = _write_letor(tmp_path / "tiny.txt")
    held_out = _write_letor(tmp_path / "held_out.txt", queries=6, seed=1, first_qid=1000)
    out = tmp_path / "res.json"
    threads = torch.get_num_threads()
    try:
        res = bench.main(
            [
                "--quick",
                "--data",
                str(data),
                "--json",
                str(out),
                "--test",
                str(held_out),
                "--set",
                f"data.letor_num_features={N_FEATURES}",
                "--set",
                "data.letor_upstream_feature=3",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))  # what was printed is what was written
    assert Path(saved["reliability_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["queries"] == 12 and saved["wall_s"] > 0
    # --quick: 3-fold CV repeated twice, the fixed split, and the held-out file
    assert set(saved["splits"]) == {"cv3x2", "cv3", "cv3-r2", "fixed", "test-file"}
    (external,) = saved["splits"]["test-file"]["per_part"]
    assert (external["train_queries"], external["test_queries"]) == (12, 6)  # all (quick-capped) data -> the file
    assert saved["splits"]["test-file"]["queries"] == 6 and saved["test_data"] == str(held_out)
    metrics = {"ndcg@1", "ndcg@5", "ndcg@10", "mrr"}
    for name, split in saved["splits"].items():
        assert set(split["methods"]) == set(kit_letor.METHODS)
        for entry in split["methods"].values():
            assert metrics <= set(entry) and all(0.0 <= entry[m] <= 1.0 for m in metrics)
            lo, hi = entry["ndcg@10_ci"]
            assert lo <= entry["ndcg@10"] <= hi
        assert set(split["paired"]) == {f"cotrr-ray - {m}" for m in kit_letor.METHODS if m != "cotrr-ray"}
        for pair in split["paired"].values():
            assert set(pair) == metrics
            assert pair["ndcg@10"]["ci"][0] <= pair["ndcg@10"]["mean"] <= pair["ndcg@10"]["ci"][1]
        assert set(split["calibration"]) == {"cross_fit_isotonic", "cross_fit_unaligned", "raw_sigmoid", "base_rate"}
        for c in split["calibration"].values():
            assert {"ece_equal_width", "ece_equal_mass", "brier", "log_loss", "n"} <= set(c)
        for part in split.get("per_part", []):
            assert 1 <= part["cotrr-ray"]["epochs"] <= saved["settings"]["max_epochs"]
            assert part["train_queries"] + part["test_queries"] <= (18 if name == "test-file" else 12)
    # Every query is tested exactly once across the CV folds of each repeat, with different folds.
    repeats = [saved["splits"]["cv3"], saved["splits"]["cv3-r2"]]
    for cv in repeats:
        assert sum(p["test_queries"] for p in cv["per_part"]) == 12
        assert cv["queries"] + cv["skipped"] == 12
    assert [p["test_queries"] for p in repeats[0]["per_part"]] == [4, 4, 4]
    # The repeated summary averages each query over the repeats; the mean of those averages is the
    # mean of the repeats' means (every query is in every repeat).
    both = saved["splits"]["cv3x2"]
    assert both["queries"] == repeats[0]["queries"] and both["repeats"] == 2
    for m in kit_letor.METHODS:
        expected = np.mean([cv["methods"][m]["ndcg@10"] for cv in repeats])
        assert abs(both["methods"][m]["ndcg@10"] - expected) < 1e-9
    assert saved["lambdamart_fixed_params"]["objective"] == "lambdarank"


def test_held_out_file_must_not_share_queries_with_the_data(tmp_path):
    bench = _load_bench()
    from cotrr_ray.data.readers import read_letor

    lists = read_letor(_write_letor(tmp_path / "a.txt"), num_features=N_FEATURES, upstream_feature=3, window=32)
    with pytest.raises(ValueError, match="shares 4 query ids"):
        bench.make_splits(lists, bench.Settings(), lists[10:])
    splits = bench.make_splits(lists[:10], bench.Settings(), lists[10:])
    assert splits["test-file"] == [(lists[:10], lists[10:])]


def test_fetch_checks_the_archive_digest_and_extracts_one_file(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    fetch_mslr_test = _load_bench("fetch_mslr_test")
    buf = io.BytesIO()
    payload = b"1 qid:5 1:0.5 2:1.0\n"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(fetch_mslr_test.MEMBER)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    archive = buf.getvalue()
    out = tmp_path / "d" / "test.txt"
    with pytest.raises(ValueError, match="sha256"):
        fetch_mslr_test.extract(archive, out)  # not the pinned archive
    assert not out.exists()
    monkeypatch.setattr(fetch_mslr_test, "SHA256", hashlib.sha256(archive).hexdigest())
    assert fetch_mslr_test.extract(archive, out).read_bytes() == payload


TINY = [
    f"data.letor_num_features={N_FEATURES}",
    "data.letor_upstream_feature=3",
    "model.d_model=16",
    "model.n_heads=2",
    "optim.max_epochs=2",
    "optim.patience=2",
    "calibration.folds=2",
    "calibration.min_samples=10",
]


def test_tuning_script_runs_the_benchs_selection_and_compares_with_the_config(tmp_path):
    tuning = _load_bench("mslr_tuning")
    data = _write_letor(tmp_path / "tiny.txt")
    out = tmp_path / "tuning.json"
    threads = torch.get_num_threads()
    try:
        res = tuning.main(
            ["--quick", "--data", str(data), "--json", str(out), *sum((["--set", o] for o in TINY[:2]), [])]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    quick = _load_bench().quick_settings()
    assert [v["variant"] for v in res["variants"]] == [dict(v) for v in quick.variants]
    for v in res["variants"]:
        assert len(v["inner_curve"]) == quick.max_epochs and 1 <= v["epochs"] <= quick.max_epochs
    best = max(res["variants"], key=lambda v: v["inner_ndcg@10_smoothed"])
    assert res["chosen"] == best
    assert res["config_holds_choice"]["optim.max_epochs"]["chosen"] == best["epochs"]


def test_calibration_shift_bench_chooses_on_training_queries_only(tmp_path):
    shift = _load_bench("calibration_shift")
    data = _write_letor(tmp_path / "tiny.txt")
    held_out = _write_letor(tmp_path / "held_out.txt", queries=6, seed=1, first_qid=1000)
    out = tmp_path / "shift.json"
    threads = torch.get_num_threads()
    try:
        res = shift.main(
            ["--data", str(data), "--test", str(held_out), "--json", str(out), "--bootstrap", "50"]
            + sum((["--set", o] for o in TINY), [])
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert set(res["choice"]["scores"]) == set(shift.CALIBRATORS)
    assert res["chosen"] == min(res["choice"]["scores"], key=lambda n: res["choice"]["scores"][n]["brier"])
    assert set(res["test"]) == set(shift.CALIBRATORS) | {
        "constant: training base rate",
        "constant: test base rate (oracle)",
    }
    for c in res["test"].values():
        lo, hi = c["brier_ci"]
        assert lo <= hi and c["n"] == sum(1 for line in held_out.read_text().splitlines() if line)
    # The oracle constant's ECE is ~0 by construction: the reason ECE is never read alone.
    assert res["test"]["constant: test base rate (oracle)"]["ece_equal_width"] < 1e-9


def test_list_features_are_within_list_statistics():
    shift = _load_bench("calibration_shift")
    f = shift.list_features(np.array([3.0, 1.0, 2.0]))
    np.testing.assert_allclose(f["rank_frac"], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(f["rank_score"], [1.0, 0.0, 0.5])  # isotonic fits need it increasing
    np.testing.assert_allclose(f["centred"], [1.0, -1.0, 0.0])
    np.testing.assert_allclose(f["list_z"], np.array([1.0, -1.0, 0.0]) / np.std([3.0, 1.0, 2.0]))
    assert shift.list_features(np.array([2.0]))["list_z"].tolist() == [0.0]


def test_cotrr_choices_and_training_never_see_the_test_queries(tmp_path, monkeypatch):
    """Nested selection: in a part, every list cotrr-ray trains or selects on comes from its training queries."""
    bench = _load_bench()
    from cotrr_ray.config import TrainConfig
    from cotrr_ray.data.readers import letor_spec, read_letor

    path = _write_letor(tmp_path / "tiny.txt", queries=12)
    lists = read_letor(path, num_features=N_FEATURES, upstream_feature=3, window=32)
    train, test = lists[:9], lists[9:]
    seen: set[str] = set()
    real_prepare, real_all = bench.prepare_splits, bench.all_queries_data

    def spy_prepare(cfg, spec, splits):
        seen.update(cl.query_id for part in splits.values() for cl in part)
        return real_prepare(cfg, spec, splits)

    def spy_all(cfg, spec, ls, fp=None):
        seen.update(cl.query_id for cl in ls)
        return real_all(cfg, spec, ls, fp)

    monkeypatch.setattr(bench, "prepare_splits", spy_prepare)
    monkeypatch.setattr(bench, "all_queries_data", spy_all)
    s = bench.quick_settings()
    cfg = TrainConfig.from_yaml(REPO / "configs" / "mslr.yaml", [*s.model_overrides, *TINY[:2], f"data.path={path}"])
    threads = torch.get_num_threads()
    try:
        scores, info = bench.cotrr_method(cfg, letor_spec(N_FEATURES), train, test, s, 1.0, path, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert seen == {cl.query_id for cl in train}  # the selection and the recipe: training queries only
    assert [len(z) for z in scores] == [cl.window for cl in test]
    assert info["variant"] in {bench.variant_name(v) for v in s.variants}
    assert len(info["selection"]["variants"]) == len(s.variants)
