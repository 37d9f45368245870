from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CandidateList
from cotrr_ray.training.evaluate import RANKING_METRICS, evaluate_lists, format_report

CAL_KEYS = {"ece_equal_width", "ece_equal_mass", "brier", "log_loss"}


def _cl(qid: str, labels, window: int | None = None) -> CandidateList:
    labels = np.asarray(labels, np.float32)
    n = len(labels)
    w = n if window is None else window
    return CandidateList(qid, [f"{qid}-{i}" for i in range(n)], -np.arange(n, dtype=np.float32), w, {}, {}, labels)


def _random_lists(n_lists: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    lists, logits = [], []
    for k in range(n_lists):
        n = int(rng.integers(6, 16))
        w = int(rng.integers(3, n + 1))
        lists.append(_cl(f"q{k}", rng.integers(0, 5, n) * (rng.random(n) < 0.6)))
        lists[-1].window = w
        logits.append(rng.normal(size=w).astype(np.float32))
    return lists, logits


# --------------------------------------------------------------------------- evaluate_lists


def test_evaluate_hand_made_values() -> None:
    # Upstream order puts the 3 at position 3 and the 1 at position 4; the model fixes both.
    lists = [_cl("a", [0, 0, 3, 1])]
    report = evaluate_lists(lists, [np.array([0.0, 0.0, 1.0, 0.5])], None, relevance_threshold=1.0, n_boot=100)
    dcg_up = 7 / math.log2(4) + 1 / math.log2(5)
    ideal = 7 + 1 / math.log2(3)
    assert report["queries"] == 1 and report["skipped"] == 0
    assert report["ndcg@10"]["upstream"] == pytest.approx(dcg_up / ideal)
    assert report["ndcg@10"]["model"] == pytest.approx(1.0)
    assert report["ndcg@1"]["upstream"] == 0.0
    assert report["mrr"]["upstream"] == pytest.approx(1 / 3) and report["mrr"]["model"] == 1.0
    assert "calibrated" not in report["calibration"]


def test_tail_stays_in_upstream_order_for_model_and_oracle() -> None:
    # The only relevant candidate sits in the tail (index 3, window 2): no reranker can lift it.
    lists = [_cl("t", [0, 0, 0, 2, 0], window=2)]
    report = evaluate_lists(lists, [np.array([5.0, -5.0])], None, relevance_threshold=1.0, n_boot=100)
    expected = 1 / math.log2(5)  # rank 4 whatever the window order
    for k in ("model", "upstream", "oracle"):
        assert report["ndcg@10"][k] == pytest.approx(expected)
        assert report["mrr"][k] == pytest.approx(1 / 4)


def test_oracle_dominates_model_and_upstream() -> None:
    lists, logits = _random_lists()
    report = evaluate_lists(lists, logits, None, relevance_threshold=1.0, n_boot=200)
    for m in RANKING_METRICS:
        e = report[m]
        assert e["oracle"] >= e["model"] - 1e-12 and e["oracle"] >= e["upstream"] - 1e-12
        assert e["oracle"] > e["model"]  # random scores are not perfect
        lo, hi = e["model_ci"]
        assert lo <= e["model"] <= hi


def test_perfect_model_equals_oracle() -> None:
    lists, _ = _random_lists(seed=1)
    perfect = [cl.labels[: cl.window].copy() for cl in lists]
    report = evaluate_lists(lists, perfect, None, relevance_threshold=1.0, n_boot=100)
    for m in RANKING_METRICS:
        assert report[m]["model"] == report[m]["oracle"]
        assert report[m]["model_ci"] == report[m]["oracle_ci"]
    # And a reversed model is worse than upstream-or-better orders.
    reversed_ = [-x for x in perfect]
    bad = evaluate_lists(lists, reversed_, None, relevance_threshold=1.0, n_boot=100)
    assert bad["ndcg@10"]["model"] < report["ndcg@10"]["upstream"]


def test_queries_without_relevant_candidate_skipped_and_counted() -> None:
    lists = [_cl("a", [0, 2, 1]), _cl("b", [0, 0, 0]), _cl("c", [1, 0, 0])]
    report = evaluate_lists(lists, [np.zeros(3)] * 3, None, relevance_threshold=1.0, n_boot=100)
    assert report["queries"] == 2 and report["skipped"] == 1


def test_unlabelled_list_rejected() -> None:
    cl = _cl("a", [1, 0])
    cl.labels = None
    with pytest.raises(ValueError, match="no labels"):
        evaluate_lists([cl], [np.zeros(2)], None, relevance_threshold=1.0)


def test_report_shape_matches_the_json_contract() -> None:
    lists, logits = _random_lists(seed=2)
    y = np.concatenate([cl.labels[: cl.window] >= 1 for cl in lists]).astype(float)
    cal = IsotonicCalibrator(min_samples=1).fit(np.concatenate(logits), y)
    report = evaluate_lists(lists, logits, cal, relevance_threshold=1.0, n_boot=100)
    # {"queries": n, "ndcg@1"|"ndcg@5"|"ndcg@10"|"mrr": {"model", "upstream", "oracle", "model_ci"},
    #  "calibration": {"raw"|"calibrated": {ece_equal_width, ece_equal_mass, brier, log_loss}}}
    assert isinstance(report["queries"], int) and report["queries"] > 0
    for m in ("ndcg@1", "ndcg@5", "ndcg@10", "mrr"):
        e = report[m]
        assert {"model", "upstream", "oracle", "model_ci"} <= set(e)
        for k in ("model", "upstream", "oracle"):
            assert isinstance(e[k], float) and 0.0 <= e[k] <= 1.0
        assert isinstance(e["model_ci"], list) and len(e["model_ci"]) == 2
    assert set(report["calibration"]) == {"raw", "calibrated"}
    for name in ("raw", "calibrated"):
        c = report["calibration"][name]
        assert CAL_KEYS <= set(c)
        assert all(isinstance(c[k], float) and math.isfinite(c[k]) for k in CAL_KEYS)
    n_window = sum(cl.window for cl in lists)
    assert report["calibration"]["raw"]["n"] == n_window
    # Isotonic on its own fitting data is at least as well calibrated as the raw sigmoid.
    assert report["calibration"]["calibrated"]["brier"] <= report["calibration"]["raw"]["brier"]
    # JSON-safe as written by `--json`: no NaN, no numpy types.
    again = json.loads(json.dumps(report, allow_nan=False))
    assert again["ndcg@10"]["model"] == report["ndcg@10"]["model"]


def test_relevance_threshold_changes_the_event() -> None:
    lists, logits = _random_lists(seed=3)
    lo = evaluate_lists(lists, logits, None, relevance_threshold=1.0, n_boot=100)
    hi = evaluate_lists(lists, logits, None, relevance_threshold=3.0, n_boot=100)
    assert hi["calibration"]["raw"]["base_rate"] < lo["calibration"]["raw"]["base_rate"]
    assert hi["relevance_threshold"] == 3.0


def test_format_report_renders_every_metric() -> None:
    lists, logits = _random_lists(seed=4)
    y = np.concatenate([cl.labels[: cl.window] >= 1 for cl in lists]).astype(float)
    cal = IsotonicCalibrator(min_samples=1).fit(np.concatenate(logits), y)
    report = evaluate_lists(lists, logits, cal, relevance_threshold=1.0, n_boot=100)
    text = format_report(report, title="unit test")
    assert text.startswith(f"unit test: {report['queries']} queries")
    for m in RANKING_METRICS:
        assert any(line.startswith(m) for line in text.splitlines())
    assert f"{report['ndcg@10']['model']:.4f}" in text
    assert "raw sigmoid" in text and "calibrated" in text
    assert f"{report['calibration']['calibrated']['brier']:.4f}" in text


# --------------------------------------------------------------------------- the CLI never scores training queries


def _manifest(fingerprint: str, splits: dict[str, float], salt: str = "s") -> dict:
    return {"data_fingerprint": fingerprint, "train_config": {"data": {"splits": splits, "split_salt": salt}}}


def test_training_file_is_scored_on_its_test_split_only(test_data) -> None:
    from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
    from cotrr_ray.data.readers import file_fingerprint, read_jsonl
    from cotrr_ray.data.splits import split_by_query
    from cotrr_ray.training.evaluate import held_out_only

    lists = read_jsonl(test_data, IMAGE_SEARCH_SPEC, window=8)
    splits = {"train": 0.6, "validation": 0.1, "calibration": 0.1, "test": 0.2}
    kept, scope = held_out_only(lists, test_data, _manifest(file_fingerprint(test_data), splits))
    expected = split_by_query(lists, splits, "s")["test"]
    assert [cl.query_id for cl in kept] == [cl.query_id for cl in expected]
    assert 0 < len(kept) < len(lists) and "held-out test queries" in scope

    other, scope = held_out_only(lists, test_data, _manifest("sha256:another-file", splits))
    assert other is lists and "other than" in scope

    with pytest.raises(SystemExit, match="no test split"):
        held_out_only(lists, test_data, _manifest(file_fingerprint(test_data), {"train": 0.8, "validation": 0.2}))


def test_cli_reports_its_scope(bundle_a, test_data, tmp_path, capsys) -> None:
    from cotrr_ray.training.evaluate import main

    out = tmp_path / "report.json"
    main(["--bundle", str(bundle_a), "--data", str(test_data), "--json", str(out), "--bootstrap", "50"])
    report = json.loads(out.read_text())
    assert "other than the bundle's training data" in report["scope"]  # the test bundle records "test-0"
    assert report["queries"] + report["skipped"] == 150
    assert "scored:" in capsys.readouterr().out
