"""``python -m cotrr_ray.data convert``: JSON Lines or LETOR -> a Parquet dataset (`cotrr_ray.data.parquet`).

    python -m cotrr_ray.data convert --input data.jsonl --output s3://bucket/datasets/demo [--window 20]
    python -m cotrr_ray.data convert --input train.txt --format letor --output DIR [--queries-per-shard N]

Streaming: the input is read one record at a time through the readers' own validators
(`iter_jsonl_lists`, `iter_letor_lists`), so a file fails exactly as `read_jsonl` / `read_letor`
fail on it, with the same message naming file, line, query, candidate and field. Memory holds one
row group of lists, plus the query ids seen so far (the duplicate check: about 100 bytes a query).
A failed conversion leaves no manifest, so its output is never read as a dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC, FeatureSpec
from cotrr_ray.data.parquet import DEFAULT_QUERIES_PER_ROW_GROUP, DEFAULT_QUERIES_PER_SHARD, write_dataset
from cotrr_ray.data.readers import DataError, iter_jsonl_lists, iter_letor_lists, letor_spec
from cotrr_ray.storage import StorageError

DEFAULT_JSONL_WINDOW = 20  # the default Top-M: JSONL tails carry no features


def convert(
    input: str | Path,
    output: str | Path,
    *,
    format: str = "jsonl",
    spec: FeatureSpec | None = None,
    window: int | None = DEFAULT_JSONL_WINDOW,
    queries_per_shard: int = DEFAULT_QUERIES_PER_SHARD,
    queries_per_row_group: int = DEFAULT_QUERIES_PER_ROW_GROUP,
    letor_num_features: int = 136,
    letor_upstream_feature: int | str = 110,
    require_labels: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert one file; returns the manifest. `window`: the Top-M whose features are stored (None: all)."""
    source: dict[str, Any] = {"path": str(input), "format": format, "require_labels": require_labels}
    if format == "jsonl":
        spec = spec or IMAGE_SEARCH_SPEC
        lists = iter_jsonl_lists(input, spec, window=window, require_labels=require_labels)
    elif format == "letor":
        if spec is not None and spec != letor_spec(letor_num_features):
            raise ValueError("LETOR files have one group: their spec is letor_spec(letor_num_features)")
        spec = letor_spec(letor_num_features)
        lists = iter_letor_lists(
            input, num_features=letor_num_features, upstream_feature=letor_upstream_feature, window=window
        )
        source.update(letor_num_features=letor_num_features, letor_upstream_feature=letor_upstream_feature)
    else:
        raise ValueError(f"format must be jsonl or letor, got {format!r}")
    return write_dataset(
        (cl for _, cl in lists),
        output,
        spec,
        window=window,
        queries_per_shard=queries_per_shard,
        queries_per_row_group=min(queries_per_row_group, queries_per_shard),
        source=source,
        overwrite=overwrite,
    )


def _window(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"error: --window must be a positive integer or 'all', got {value!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.data", description="Dataset tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="JSON Lines or LETOR -> Parquet shards (local path or s3://)")
    c.add_argument("--input", required=True, help="a local JSONL or LETOR file")
    c.add_argument("--output", required=True, help="dataset directory or URI (s3://bucket/prefix)")
    c.add_argument("--format", choices=["jsonl", "letor"], default="jsonl")
    c.add_argument("--queries-per-shard", type=int, default=DEFAULT_QUERIES_PER_SHARD)
    c.add_argument("--queries-per-row-group", type=int, default=DEFAULT_QUERIES_PER_ROW_GROUP)
    c.add_argument(
        "--window",
        help=f"Top-M whose features are stored, or 'all' (default: {DEFAULT_JSONL_WINDOW} for jsonl, all for letor)",
    )
    c.add_argument("--feature-spec", help="JSON/YAML file of a FeatureSpec (jsonl; default image-search-v1)")
    c.add_argument("--letor-num-features", type=int, default=136)
    c.add_argument(
        "--letor-upstream-feature",
        type=lambda v: v if v == "file_order" else int(v),
        default=110,
        help="1-based feature whose value descending is the upstream order, or file_order",
    )
    c.add_argument("--unlabelled", action="store_true", help="labels optional (inference data)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec = None
    if args.feature_spec:
        spec = FeatureSpec.model_validate(yaml.safe_load(Path(args.feature_spec).read_text()))
    if args.window is not None:
        window = _window(args.window)
    else:
        window = DEFAULT_JSONL_WINDOW if args.format == "jsonl" else None
    try:
        m = convert(
            args.input,
            args.output,
            format=args.format,
            spec=spec,
            window=window,
            queries_per_shard=args.queries_per_shard,
            queries_per_row_group=args.queries_per_row_group,
            letor_num_features=args.letor_num_features,
            letor_upstream_feature=args.letor_upstream_feature,
            require_labels=not args.unlabelled,
            overwrite=args.overwrite,
        )
    except (DataError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {m['queries']} queries, {m['candidates']} candidates in {len(m['shards'])} shards")
    return 0
