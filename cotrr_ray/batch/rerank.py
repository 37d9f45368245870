"""Batch reranking without Ray: what one Ray Data actor does to a batch, and the results format.

    job, source = prepare(BatchOptions(bundle=..., input=..., output=...))   # driver: checks, no Ray
    reranker = BatchReranker(job)                                           # once per actor
    table = reranker(arrow_batch)                                           # one row per query

**The same core as serving.** A batch goes through the functions `POST /v1/rerank` runs, not a copy
of them: the Parquet/JSONL readers' validators (`batch_to_lists`, `iter_jsonl_lists`), the request's
window cut (`serving.api.window_only`), `ScorerCore.score` (the Scorer's model call, calibrated by
the bundle's own isotonic calibrator exactly like `CalibratorCore.transform`), then
`core.ranking.model_order` and `build_results`. So for the same inputs the rows equal the HTTP
responses (tested over HTTP against a real Serve app).

**Results** (one row per query, the response's shape as columns, candidates in final order):

    query_id       string
    model_version  string                 the bundle id that ordered the list
    calibrated     bool                   always true here (no fallback in batch: errors fail the job)
    ids            list<string>           candidate ids, final order (the first top_n when set)
    index          list<int32>            upstream position of each
    score          list<float64>          raw logit; null past the window (tail, upstream order)
    probability    list<float64>          calibrated P(label >= relevance_threshold); null past the window

A results directory is written like a converted dataset: `part-*.parquet` shards, each written
under a temporary name and renamed (locally) or uploaded in one piece (S3), and `_manifest.json`
last, listing the shards in order; a directory without the manifest is an unfinished run.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.bundles.registry import BundleSource
from cotrr_ray.core.ranking import build_results, model_order
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.parquet import (
    DEFAULT_QUERIES_PER_ROW_GROUP,
    MANIFEST,
    ParquetDataset,
    arrow_schema,
    batch_to_lists,
    check_output,
    lists_to_batch,
    open_parquet_dataset,
)
from cotrr_ray.data.readers import DataError, iter_jsonl_lists
from cotrr_ray.serving.api import window_only
from cotrr_ray.storage import Location, locate, read_bytes, upload_file, write_bytes

RESULTS_FORMAT = "cotrr-ray/rerank-results"
RESULTS_FORMAT_VERSION = 1
DEFAULT_BATCH_QUERIES = 256
DEFAULT_QUERIES_PER_SHARD = 10_000
PATH_COLUMN = "path"  # added by ray.data.read_parquet(include_paths=True): the shard a row came from

_NULLABLE_F64 = pa.list_(pa.field("item", pa.float64(), nullable=True))
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("calibrated", pa.bool_(), nullable=False),
        pa.field("ids", pa.list_(pa.field("item", pa.string(), nullable=False)), nullable=False),
        pa.field("index", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False),
        pa.field("score", _NULLABLE_F64, nullable=False),
        pa.field("probability", _NULLABLE_F64, nullable=False),
    ]
)


@dataclass(frozen=True)
class BatchOptions:
    bundle: str  # a bundle directory, registry id URI or `<registry>/<name>@<alias>`, local or s3://
    input: str  # a Parquet dataset directory (local or s3://) or a local JSONL file
    output: str  # results directory (local or s3://)
    format: str | None = None  # "parquet" | "jsonl"; None: jsonl for *.jsonl / *.json, else parquet
    top_m: int | None = None  # the window; default the bundle's top_m (the HTTP API's default)
    top_n: int | None = None  # keep the first top_n results per query (as the request's top_n)
    batch_size: int = DEFAULT_BATCH_QUERIES  # queries per model call
    actors: int = 1
    cpus_per_actor: float = 1.0
    queries_per_shard: int = DEFAULT_QUERIES_PER_SHARD
    overwrite: bool = False


@dataclass(frozen=True)
class BatchJob:
    """What every actor needs (picklable): the bundle's fixed version, the spec and the window."""

    bundle_uri: str  # the fixed version an alias named when the job started: every actor loads the same one
    bundle_id: str
    spec: FeatureSpec
    window: int
    stored_window: int | None  # the window the input's features were stored at (None: whole lists)
    top_n: int | None


@dataclass(frozen=True)
class InputSource:
    format: str  # "parquet" | "jsonl"
    uri: str
    dataset: ParquetDataset | None  # parquet: the checked manifest; its `paths` feed ray.data.read_parquet


def input_format(path: str, requested: str | None) -> str:
    if requested is not None:
        if requested not in ("parquet", "jsonl"):
            raise ValueError(f"--format must be parquet or jsonl, got {requested!r}")
        return requested
    return "jsonl" if path.rstrip("/").endswith((".jsonl", ".json")) else "parquet"


def prepare(opts: BatchOptions) -> tuple[BatchJob, InputSource, Location]:
    """Every check that needs no Ray, on the driver, before any actor starts: the bundle resolves and
    loads its metadata, the input is a complete dataset for the bundle's spec (every shard's footer),
    and the output is empty (or `overwrite`). Raises `BundleError`, `DataError` or `ValueError`."""
    for name in ("batch_size", "actors", "queries_per_shard"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(opts, name)}")
    if opts.cpus_per_actor <= 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {opts.cpus_per_actor}")
    # An alias is resolved once, here: a promotion during the run must not mix two models in one output.
    fixed_uri, local = BundleSource.parse(opts.bundle).resolve()
    meta = read_meta(local)
    window = opts.top_m or meta.top_m
    if not 1 <= window <= meta.top_m:
        raise ValueError(f"top_m must be in 1..{meta.top_m} (the bundle's top_m), got {window}")
    if opts.top_n is not None and opts.top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {opts.top_n}")
    fmt = input_format(opts.input, opts.format)
    if fmt == "parquet":
        ds = open_parquet_dataset(opts.input, meta.spec)
        for i in range(len(ds.manifest["shards"])):  # footers only: schema, metadata, row count vs manifest
            ds.open_shard(i).close()
        source, stored = InputSource("parquet", ds.location.uri, ds), ds.window
    else:
        if not Path(opts.input).is_file():
            raise DataError(f"{opts.input}: no such file (JSONL input is read from a local path)")
        source, stored = InputSource("jsonl", str(Path(opts.input).resolve()), None), window
    out = locate(opts.output)
    if out.uri.rstrip("/") == source.uri.rstrip("/"):
        raise ValueError(f"--output {out.uri} is the input")
    check_output(out, overwrite=opts.overwrite)
    job = BatchJob(fixed_uri, meta.bundle_id, meta.spec, window, stored, opts.top_n)
    return job, source, out


def jsonl_tables(
    path: str, spec: FeatureSpec, window: int, queries: int = DEFAULT_QUERIES_PER_ROW_GROUP
) -> Iterator[pa.Table]:
    """A JSONL file as Arrow tables of the Parquet dataset schema (stored window = `window`), read by
    the readers' own validator, so a bad file fails with the message `read_jsonl` gives."""
    schema = arrow_schema(spec, window)
    chunk = []
    for _, cl in iter_jsonl_lists(path, spec, window=window, require_labels=False):
        chunk.append(cl)
        if len(chunk) == queries:
            yield pa.Table.from_batches([lists_to_batch(chunk, schema, spec)])
            chunk = []
    if chunk:
        yield pa.Table.from_batches([lists_to_batch(chunk, schema, spec)])


class BatchReranker:
    """One actor's state: the bundle loaded once (through the registry cache), scoring Arrow batches."""

    def __init__(self, job: BatchJob, *, threads: int | None = None):
        import torch

        from cotrr_ray.serving.scorer import ScorerCore

        if threads is not None:  # an actor's CPU share; torch would otherwise start one thread per core
            torch.set_num_threads(max(1, threads))
        self.job = job
        self.core = ScorerCore.load(job.bundle_uri)
        if self.core.bundle.bundle_id != job.bundle_id:
            raise RuntimeError(f"{job.bundle_uri} holds bundle {self.core.bundle.bundle_id}, not {job.bundle_id}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for part, where in _by_source(batch):
            lists = batch_to_lists(
                part,
                self.job.spec,
                stored_window=self.job.stored_window,
                window=self.job.window,
                require_labels=False,
                where=where,
            )
            rows += self.rerank(lists)
        return results_table(rows)

    def rerank(self, lists: list) -> list[dict[str, Any]]:
        """The response rows of validated lists: one model call for the batch, then the serving order."""
        scored = self.core.score([window_only(cl) for cl in lists], calibrate=True)
        out = []
        for cl, r in zip(lists, scored):
            logits = np.asarray(r.logits)
            if logits.shape != (cl.window,) or not np.isfinite(logits).all():
                # Serving would answer this request in upstream order, flagged; a batch output has no
                # such flag, so a bad model output fails the job instead of hiding in the results.
                raise RuntimeError(f"query {cl.query_id!r}: bundle {r.model_version} gave non-finite logits")
            order = model_order(logits, len(cl))
            items = build_results(
                cl.ids, order, window=cl.window, logits=logits, probabilities=r.probabilities, top_n=self.job.top_n
            )
            out.append({"query_id": cl.query_id, "model_version": r.model_version, "results": items})
        return out


def _by_source(batch: pa.Table) -> Iterator[tuple[pa.RecordBatch, str]]:
    """The batch as record batches, each from one shard (named in reader errors)."""
    if PATH_COLUMN not in batch.column_names:
        yield from ((rb, "<jsonl input>") for rb in batch.combine_chunks().to_batches())
        return
    paths = batch.column(PATH_COLUMN).to_pylist()
    start = 0
    for i in range(1, len(paths) + 1):
        if i == len(paths) or paths[i] != paths[start]:
            part = batch.slice(start, i - start).drop_columns([PATH_COLUMN]).combine_chunks()
            # Ray Data drops the row numbers: the error names the shard and the row within this batch.
            yield from ((rb, f"{paths[start]} (a Ray Data batch of it)") for rb in part.to_batches())
            start = i


def results_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Response rows (`query_id`, `model_version`, `build_results` items) as a `RESULTS_SCHEMA` table."""
    cols: dict[str, list] = {f: [] for f in RESULTS_SCHEMA.names}
    for row in rows:
        items = row["results"]
        cols["query_id"].append(row["query_id"])
        cols["model_version"].append(row["model_version"])
        cols["calibrated"].append(all(it["probability"] is not None for it in items if it["reranked"]))
        cols["ids"].append([it["id"] for it in items])
        cols["index"].append([it["index"] for it in items])
        cols["score"].append([it["score"] for it in items])
        cols["probability"].append([it["probability"] for it in items])
    return pa.Table.from_pydict(cols, schema=RESULTS_SCHEMA)


# ----------------------------------------------------------------------------- results on storage


def write_results_shard(table: pa.Table, output: str) -> dict[str, Any]:
    """Write one shard of results under `output` so it appears whole or not at all; returns its entry."""
    out = locate(output)
    name = f"part-{uuid.uuid4().hex}.parquet"  # written by parallel tasks: names cannot be counted
    with tempfile.TemporaryDirectory(prefix="cotrr-results-") as tmp:
        local = os.path.join(tmp, name)
        pq.write_table(table, local, compression="zstd")
        size = os.path.getsize(local)
        upload_file(Path(local), out.child(name))  # local: temp name + rename; S3: one upload
    return {"path": name, "queries": table.num_rows, "bytes": size}


def write_results_manifest(out: Location, job: BatchJob, source: InputSource, shards: list[dict], extra: dict) -> dict:
    """The results' last write: its presence says every listed shard is complete."""
    manifest = {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": job.bundle_id,
        "bundle_uri": job.bundle_uri,
        "spec_fingerprint": job.spec.fingerprint(),
        "window": job.window,
        "top_n": job.top_n,
        "input": {"format": source.format, "uri": source.uri},
        "queries": sum(s["queries"] for s in shards),
        "shards": shards,
        **extra,
    }
    write_bytes(out.child(MANIFEST), json.dumps(manifest, indent=1).encode() + b"\n")
    return manifest


def read_results(uri: str) -> tuple[dict[str, Any], pa.Table]:
    """(manifest, every row in manifest order) of a finished results directory; refused without a manifest."""
    loc = locate(uri)
    try:
        manifest = json.loads(read_bytes(loc.child(MANIFEST)))
    except FileNotFoundError:
        raise DataError(f"{loc.uri}: no {MANIFEST}: not a batch output, or its run did not finish") from None
    if manifest.get("format") != RESULTS_FORMAT or manifest.get("format_version") != RESULTS_FORMAT_VERSION:
        raise DataError(f"{loc.uri}: not a {RESULTS_FORMAT} v{RESULTS_FORMAT_VERSION} directory")
    tables = [
        pq.read_table(loc.child(s["path"]).path, filesystem=loc.filesystem, schema=RESULTS_SCHEMA)
        for s in manifest["shards"]
    ]
    table = pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()
    if table.num_rows != manifest["queries"]:
        raise DataError(f"{loc.uri}: {table.num_rows} rows, {MANIFEST} lists {manifest['queries']}")
    return manifest, table


def options_record(opts: BatchOptions) -> dict[str, Any]:
    return asdict(opts)
