"""``python -m cotrr_ray.batch``: rerank a whole dataset offline, results in the HTTP response's shape.

    python -m cotrr_ray.batch --bundle artifacts/registry/demo@production --input s3://bucket/datasets/v1 \
        --output s3://bucket/reranked/v1 [--top-m 20] [--top-n N] [--batch-size 256] [--actors 2] [--cpus-per-actor 1]
    ray job submit --address http://head:8265 --working-dir . -- python -m cotrr_ray.batch ...

Bad input fails before any actor starts where it can (bundle, manifest, spec, shard footers, the
output directory), with the readers' messages and exit 2; no manifest is written for a failed run.
"""

from __future__ import annotations

import argparse
import json
import sys

from cotrr_ray.batch.rerank import DEFAULT_BATCH_QUERIES, DEFAULT_QUERIES_PER_SHARD, BatchOptions
from cotrr_ray.bundles.bundle import BundleError
from cotrr_ray.data.readers import DataError
from cotrr_ray.storage import StorageError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.batch", description="Offline batch reranking (Ray Data).")
    p.add_argument("--bundle", required=True, help="bundle directory, registry bundle URI or <registry>/<name>@<alias>")
    p.add_argument("--input", required=True, help="Parquet dataset directory (local or s3://) or a local .jsonl file")
    p.add_argument("--output", required=True, help="results directory (local or s3://); must be empty")
    p.add_argument("--format", choices=["parquet", "jsonl"], help="input format (default: jsonl for *.jsonl)")
    p.add_argument("--top-m", type=int, help="window to rerank (default: the bundle's top_m)")
    p.add_argument("--top-n", type=int, help="keep the first N results per query")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_QUERIES, help="queries per model call")
    p.add_argument("--actors", type=int, default=1, help="scoring actors (each loads the bundle once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves (torch threads)")
    p.add_argument("--queries-per-shard", type=int, default=DEFAULT_QUERIES_PER_SHARD)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier results directory at --output")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    opts = BatchOptions(
        bundle=a.bundle,
        input=a.input,
        output=a.output,
        format=a.format,
        top_m=a.top_m,
        top_n=a.top_n,
        batch_size=a.batch_size,
        actors=a.actors,
        cpus_per_actor=a.cpus_per_actor,
        queries_per_shard=a.queries_per_shard,
        overwrite=a.overwrite,
    )
    from cotrr_ray.batch.pipeline import run  # imports Ray: after the arguments parsed

    try:
        m = run(opts)
    except (DataError, BundleError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: m[k] for k in ("queries", "model_version", "window", "timings")}
    print(f"{a.output}: {len(m['shards'])} shards " + json.dumps(summary))
    return 0
