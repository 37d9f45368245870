"""Held-out evaluation of a bundle: ranking quality and calibration, with bootstrap intervals.

    python -m cotrr_ray.training.evaluate --bundle DIR|<registry>/<name>@<alias>|<registry>/<name>/<id> --data FILE [--format letor|jsonl] [--json OUT] [--all-queries]

When FILE is the very file the bundle was trained on (same sha256 as the bundle's data fingerprint),
only the queries of its test split are scored: the others trained the model or its calibrator.

Ranking metrics are over each query's FULL list after reranking (the Top-M window reordered by
the model, the tail kept in upstream order), gain 2^rel - 1, log2 discount; queries without a
relevant candidate are skipped and counted. "oracle" is the best any Top-M reranker can do: the
window sorted by true label, the tail unchanged. Calibration metrics are over the window
candidates (the ones that get a probability), for the event label >= the bundle's threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CandidateList, labels01
from cotrr_ray.core.metrics import bootstrap_ci, calibration_report, paired_bootstrap_ci, ranking_report, sigmoid
from cotrr_ray.core.ranking import model_order, order_scores, upstream_order

RANKING_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "mrr")


def evaluate_lists(
    lists: list[CandidateList],
    window_logits: list[np.ndarray],
    calibrator: IsotonicCalibrator | None,
    *,
    relevance_threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    probabilities: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """The evaluation report (JSON-safe) for model scores on labelled lists.

    `probabilities` (per list, one per window candidate) replaces ``calibrator.predict(logits)`` as
    the "calibrated" row of the calibration report: cross-fitted evaluation passes each fold's
    probabilities from a calibrator that never saw that fold."""
    variants: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"model": [], "upstream": [], "oracle": []}
    for cl, logits in zip(lists, window_logits, strict=True):
        if cl.labels is None:
            raise ValueError(f"query {cl.query_id!r} has no labels; evaluation needs labelled data")
        n = len(cl)
        variants["model"].append((order_scores(model_order(logits, n)), cl.labels))
        variants["upstream"].append((order_scores(upstream_order(n)), cl.labels))
        variants["oracle"].append((order_scores(model_order(cl.labels[: cl.window], n)), cl.labels))
    reports = {k: ranking_report(v, relevant_threshold=relevance_threshold) for k, v in variants.items()}
    out: dict[str, Any] = {"queries": reports["model"]["queries"], "skipped": reports["model"]["skipped"]}
    for metric in RANKING_METRICS:
        entry: dict[str, Any] = {}
        for k, r in reports.items():
            entry[k] = float(np.mean(r[metric]))
            entry[f"{k}_ci"] = list(bootstrap_ci(r[metric], n_boot=n_boot, seed=seed))
        entry["model_minus_upstream_ci"] = list(
            paired_bootstrap_ci(reports["model"][metric], reports["upstream"][metric], n_boot=n_boot, seed=seed)
        )
        out[metric] = entry
    logits = np.concatenate([np.asarray(x, np.float64) for x in window_logits])
    y = labels01(lists, relevance_threshold)
    out["calibration"] = {"raw": calibration_report(sigmoid(logits), y)}
    if probabilities is not None:
        p = np.concatenate([np.asarray(x, np.float64) for x in probabilities])
        if p.shape != logits.shape:
            raise ValueError(f"probabilities has {p.size} values for {logits.size} window candidates")
        out["calibration"]["calibrated"] = calibration_report(p, y)
    elif calibrator is not None:
        out["calibration"]["calibrated"] = calibration_report(calibrator.predict(logits), y)
    out["relevance_threshold"] = relevance_threshold
    return out


def format_report(report: dict[str, Any], title: str = "held-out test queries") -> str:
    """A plain-text table of a report from `evaluate_lists`."""
    lines = [
        f"{title}: {report['queries']} queries ({report['skipped']} without a relevant candidate skipped)",
        f"{'metric':<9} {'upstream':>22} {'model':>22} {'oracle':>8}   model - upstream (95% CI)",
    ]

    def fmt(e: dict[str, Any], k: str) -> str:
        lo, hi = e[f"{k}_ci"]
        return f"{e[k]:.4f} [{lo:.4f}, {hi:.4f}]"

    for m in RANKING_METRICS:
        e = report[m]
        d_lo, d_hi = e["model_minus_upstream_ci"]
        lines.append(
            f"{m:<9} {fmt(e, 'upstream'):>22} {fmt(e, 'model'):>22} {e['oracle']:>8.4f}   "
            f"{e['model'] - e['upstream']:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]"
        )
    lines.append(f"calibration of P(label >= {report['relevance_threshold']:g}) over Top-M candidates:")
    lines.append(f"{'':<12} {'ECE(15 eq-width)':>17} {'ECE(15 eq-mass)':>16} {'Brier':>8} {'log loss':>9}")
    for name, c in report["calibration"].items():
        label = "raw sigmoid" if name == "raw" else name
        lines.append(
            f"{label:<12} {c['ece_equal_width']:>17.4f} {c['ece_equal_mass']:>16.4f} {c['brier']:>8.4f} {c['log_loss']:>9.4f}"
        )
    base = report["calibration"]["raw"]["base_rate"]
    lines.append(f"(base rate {base:.3f}; n = {report['calibration']['raw']['n']} candidates)")
    return "\n".join(lines)


def held_out_only(lists: list[CandidateList], data_path: str | Path, manifest: dict[str, Any]) -> tuple[list, str]:
    """The lists that may be scored, and what they are.

    A file whose sha256 is the bundle's training data fingerprint trained this bundle: only its test
    split (recomputed from the bundle's own split fractions and salt) is held out, so only that is
    scored. Any other file is taken as given: the bundle cannot know whether it shares queries.
    """
    from cotrr_ray.data.readers import file_fingerprint
    from cotrr_ray.data.splits import split_by_query

    if file_fingerprint(data_path) != manifest.get("data_fingerprint"):
        return lists, "all queries of a file other than the bundle's training data"
    data_cfg = manifest["train_config"]["data"]
    fractions = {k: v for k, v in data_cfg["splits"].items() if v > 0}
    if "test" not in fractions:
        cross_fitted = manifest["train_config"].get("evaluation", {}).get("method") == "cross_fit"
        raise SystemExit(
            f"{data_path} is the file this bundle was trained on and its config had no test split: "
            "no query of it is held out"
            + (" (the bundle's metrics.json holds its cross-fitted out-of-fold report)" if cross_fitted else "")
            + "; pass --all-queries to score it anyway, not as a held-out estimate"
        )
    test = split_by_query(lists, fractions, data_cfg["split_salt"])["test"]
    return test, f"the {len(test)} held-out test queries of the bundle's own training file"


def main(argv: list[str] | None = None) -> None:
    from cotrr_ray.bundles.bundle import Bundle
    from cotrr_ray.bundles.registry import BundleSource
    from cotrr_ray.data.readers import read_jsonl, read_letor

    p = argparse.ArgumentParser(prog="python -m cotrr_ray.training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory, registry id or alias (local or s3://)")
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["jsonl", "letor"], default=None, help="default: by file extension")
    p.add_argument("--json", dest="json_out", default=None, help="write the report as JSON here")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument(
        "--all-queries",
        action="store_true",
        help="score every query even when --data is the bundle's training file (not a held-out estimate)",
    )
    args = p.parse_args(argv)
    bundle = Bundle.load(BundleSource.parse(args.bundle).resolve()[1])
    fmt = args.format or ("jsonl" if str(args.data).endswith((".jsonl", ".json")) else "letor")
    if fmt == "letor":
        ((group, dim),) = bundle.spec.candidate.items()
        cfg = bundle.manifest["train_config"]["data"]
        lists = read_letor(
            args.data,
            num_features=dim,
            upstream_feature=cfg["letor_upstream_feature"],
            group=group,
            window=bundle.top_m,
        )
    else:
        lists = read_jsonl(args.data, bundle.spec, window=bundle.top_m)
    if args.all_queries:
        scope = "ALL queries, including any the bundle was trained on (not a held-out estimate)"
    else:
        lists, scope = held_out_only(lists, args.data, bundle.manifest)
    logits = []
    for start in range(0, len(lists), 256):
        logits += bundle.score(lists[start : start + 256])
    report = evaluate_lists(
        lists, logits, bundle.calibrator, relevance_threshold=bundle.relevance_threshold, n_boot=args.bootstrap
    )
    report["scope"] = scope
    print(f"scored: {scope}")
    print(format_report(report, title=f"{args.data} with bundle {bundle.bundle_id}"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
