"""The at-scale dataset format: Parquet shards of whole candidate lists, one row per query.

    python -m cotrr_ray.data convert --input data.jsonl --output s3://bucket/datasets/v1
    ds = open_parquet_dataset("s3://bucket/datasets/v1", spec)
    lists = read_parquet_records("s3://bucket/datasets/v1", spec, window=20)   # == read_jsonl(...)
    for batch in ds.iter_batches(): ...                                        # pyarrow.RecordBatch
    ray.data.read_parquet(ds.paths, filesystem=ds.filesystem)                  # the Ray Data path

**One row per query, not one per candidate.** The model is listwise: a training example is a whole
list, its loss compares candidates with each other, and its context features (z-score within the
list) need every window candidate. With a row per query:

- nothing can split a list: a Parquet row group, a Ray Data block or a shard holds whole rows, so
  any partitioning (by file, row group, block, or worker shard) is a partitioning of queries;
  rows per candidate would need a group-by (a shuffle of ~80 GB at 1M queries) to rebuild lists;
- per-batch padding is a read of the list lengths (the list offsets), no regrouping;
- the query's own features (512 floats) are stored once, not repeated on its 20 candidate rows;
- predicate pushdown works per query: row-group statistics on ``query_id`` (written in input order,
  so ranges are tight when the upstream writes queries in id order), and projection reads only the
  groups a consumer asks for (``columns=["query_id", "label"]`` for evaluation).

The price is that a row is large (the default spec: 20 x 1,037 + 512 floats = 85 KB a query), so
row groups are counted in queries: 1,000 a row group is ~85 MB before compression, under Ray
Data's 128 MiB target block, and 1M queries x 20 x 1,037 floats (83 GB) is 100 shards of 10,000.

**Schema** (derived from the `FeatureSpec`; column names follow the spec's transform keys):

    query_id            string
    candidate_ids       list<string>                        all candidates, upstream order
    upstream_score      list<float32>                       all candidates
    label               list<float32> (null: unlabelled)    all candidates
    candidate.<group>   list<fixed_size_list<float32, d>>   the first min(window, n) candidates
    query.<group>       fixed_size_list<float32, d>

Values are never null. The Parquet schema metadata key ``cotrr.dataset`` holds the format version,
the feature spec and its fingerprint, and the window the data was converted at; a reader given
another spec, or a shard without the key, fails closed. A dataset is a directory (local or
``s3://``) of ``part-NNNNN.parquet`` shards and ``_manifest.json``, written last, which lists
every shard with its query and candidate counts: without it the dataset is incomplete and is
refused. Each shard is written to a temporary file and renamed (locally) or uploaded in one piece
(object stores: an object appears whole or not at all), so a killed conversion never leaves a
torn shard that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cotrr_ray.core.features import CandidateList
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.readers import DataError
from cotrr_ray.storage import (
    Location,
    StorageError,
    delete_file,
    list_dir,
    locate,
    read_bytes,
    upload_file,
    write_bytes,
)

FORMAT = "cotrr-ray/query-lists"
FORMAT_VERSION = 1
METADATA_KEY = b"cotrr.dataset"
MANIFEST = "_manifest.json"
DEFAULT_QUERIES_PER_SHARD = 10_000
DEFAULT_QUERIES_PER_ROW_GROUP = 1_000
DEFAULT_BATCH_QUERIES = 256  # pyarrow's default (65,536 rows) would be 5 GB of image-search lists

_F32 = pa.field("item", pa.float32(), nullable=False)


def _vector(dim: int) -> pa.DataType:
    return pa.list_(_F32, dim)


def header(spec: FeatureSpec, window: int | None) -> dict[str, Any]:
    """What every shard's schema metadata and the manifest say about the data."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec_fingerprint": spec.fingerprint(),
        "spec": spec.model_dump(mode="json"),
        "window": window,
    }


def arrow_schema(spec: FeatureSpec, window: int | None) -> pa.Schema:
    """The Arrow schema of a dataset for `spec`, with the ``cotrr.dataset`` metadata."""
    fields = [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("candidate_ids", pa.list_(pa.field("item", pa.string(), nullable=False)), nullable=False),
        pa.field("upstream_score", pa.list_(_F32), nullable=False),
        pa.field("label", pa.list_(_F32), nullable=True),
    ]
    fields += [
        pa.field(f"candidate.{g}", pa.list_(pa.field("item", _vector(d), nullable=False)), nullable=False)
        for g, d in spec.candidate.items()
    ]
    fields += [pa.field(f"query.{g}", _vector(d), nullable=False) for g, d in spec.query.items()]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(header(spec, window)).encode()})


# ----------------------------------------------------------------------------- lists -> Arrow


def _offsets(lengths: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32), pa.int32())


def _stacked(parts: list[np.ndarray], dim: int) -> pa.Array:
    flat = np.concatenate(parts).astype(np.float32, copy=False).reshape(-1) if parts else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), type=_vector(dim))


def lists_to_batch(lists: list[CandidateList], schema: pa.Schema, spec: FeatureSpec) -> pa.RecordBatch:
    """Validated lists (from the readers' validators) as one record batch of `schema`."""
    window = json.loads(schema.metadata[METADATA_KEY])["window"]
    n = [len(cl) for cl in lists]
    for cl in lists:
        # The writer stores what the converter's window promises; a list read with another window
        # would make the file lie about its contents.
        expected = len(cl) if window is None else min(window, len(cl))
        if cl.window != expected:
            raise ValueError(f"query {cl.query_id!r} has window {cl.window}, the dataset stores {expected}")
    ids = pa.array([cid for cl in lists for cid in cl.ids], pa.string())
    upstream = pa.array(np.concatenate([cl.upstream for cl in lists]).astype(np.float32), pa.float32())
    has_label = [cl.labels is not None for cl in lists]
    labels = [cl.labels for cl in lists if cl.labels is not None]
    label_values = pa.array(np.concatenate(labels).astype(np.float32) if labels else np.zeros(0, np.float32))
    columns = [
        pa.array([cl.query_id for cl in lists], pa.string()),
        pa.ListArray.from_arrays(_offsets(n), ids, type=schema.field("candidate_ids").type),
        pa.ListArray.from_arrays(_offsets(n), upstream, type=schema.field("upstream_score").type),
        pa.ListArray.from_arrays(
            _offsets([k if h else 0 for k, h in zip(n, has_label)]),
            label_values,
            type=schema.field("label").type,
            mask=pa.array([not h for h in has_label]) if not all(has_label) else None,
        ),
    ]
    windows = _offsets([cl.window for cl in lists])
    for g, d in spec.candidate.items():
        vectors = _stacked([cl.features[g] for cl in lists], d)
        columns.append(pa.ListArray.from_arrays(windows, vectors, type=schema.field(f"candidate.{g}").type))
    for g, d in spec.query.items():
        columns.append(_stacked([cl.query_features[g][None] for cl in lists], d))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# ----------------------------------------------------------------------------- Arrow -> lists


def _split(values: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _first_bad_row(lengths: np.ndarray, bad: np.ndarray) -> tuple[int, int]:
    """(row, position within that row's list) of the first True in the flattened `bad`."""
    flat = int(np.flatnonzero(bad)[0])
    ends = np.cumsum(lengths)
    row = int(np.searchsorted(ends, flat, side="right"))
    return row, flat - int(ends[row] - lengths[row])


def _list_column(batch: pa.RecordBatch, name: str, where: str) -> tuple[np.ndarray, pa.Array]:
    col = batch.column(name)
    if col.null_count or col.flatten().null_count:
        raise DataError(f"{where}: column {name!r} holds nulls; the format has none")
    return col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64), col.flatten()


@dataclass
class _Rows:
    """One record batch as numpy arrays, checked for structure and finiteness."""

    where: str  # the shard's URI, for errors
    first_row: int
    qids: list[str]
    n: np.ndarray
    ids: list[list[str]]
    upstream: list[np.ndarray]
    labels: list[np.ndarray | None]
    stored: np.ndarray  # stored window per row
    candidate: dict[str, list[np.ndarray]]
    query: dict[str, np.ndarray]

    def fail(self, row: int, field: str, message: str) -> DataError:
        return DataError(f"{self.where}: row {self.first_row + row}: query {self.qids[row]!r}, {field}: {message}")


def _decode_batch(batch: pa.RecordBatch, spec: FeatureSpec, where: str, first_row: int) -> _Rows:
    qids = batch.column("query_id").to_pylist()
    n, ids = _list_column(batch, "candidate_ids", where)
    rows = _Rows(where, first_row, qids, n, [], [], [], np.zeros(0), {}, {})
    if (n == 0).any():
        raise rows.fail(int(np.flatnonzero(n == 0)[0]), "candidates", "empty list")
    flat_ids, ends = ids.to_pylist(), np.cumsum(n)
    rows.ids = [flat_ids[a:b] for a, b in zip((ends - n).tolist(), ends.tolist())]
    up_n, up = _list_column(batch, "upstream_score", where)
    up_values = up.to_numpy()
    if not np.array_equal(up_n, n):
        raise rows.fail(int(np.flatnonzero(up_n != n)[0]), "upstream_score", "length differs from candidate_ids")
    if not np.isfinite(up_values).all():
        r, i = _first_bad_row(n, ~np.isfinite(up_values))
        raise rows.fail(r, f"candidates[{i}].upstream_score", "non-finite value")
    rows.upstream = _split(up_values, n)
    label_col = batch.column("label")
    valid = label_col.is_valid().to_numpy(zero_copy_only=False)
    label_n = label_col.value_lengths().fill_null(0).to_numpy().astype(np.int64)
    label_values = label_col.flatten().to_numpy()  # skips the null (unlabelled) rows
    bad = ~np.isfinite(label_values) | (label_values < 0)
    if bad.any():
        r, i = _first_bad_row(label_n, bad)
        raise rows.fail(r, f"candidates[{i}].label", "non-finite or negative label")
    wrong = valid & (label_n != n)
    if wrong.any():
        raise rows.fail(int(np.flatnonzero(wrong)[0]), "label", "length differs from candidate_ids")
    rows.labels = [lab if v else None for v, lab in zip(valid, _split(label_values, label_n))]
    _decode_features(batch, spec, rows)
    return rows


def _decode_features(batch: pa.RecordBatch, spec: FeatureSpec, rows: _Rows) -> None:
    stored = None
    for g, d in spec.candidate.items():
        name = f"candidate.{g}"
        lengths, vectors = _list_column(batch, name, rows.where)
        values = vectors.flatten().to_numpy().reshape(-1, d)
        if stored is None:
            stored = lengths
        elif not np.array_equal(stored, lengths):
            raise rows.fail(int(np.flatnonzero(stored != lengths)[0]), name, "stores another number of candidates")
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            r, i = _first_bad_row(lengths, bad)
            raise rows.fail(r, f"candidates[{i}].features.{g}", "non-finite value")
        rows.candidate[g] = _split(values, lengths)
    rows.stored = stored if stored is not None else np.zeros(len(rows.qids), np.int64)
    for g, d in spec.query.items():
        values = batch.column(f"query.{g}").flatten().to_numpy().reshape(-1, d)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise rows.fail(int(np.flatnonzero(bad)[0]), f"query.features.{g}", "non-finite value")
        rows.query[g] = values


def batch_to_lists(
    batch: pa.RecordBatch,
    spec: FeatureSpec,
    *,
    stored_window: int | None,
    window: int | None,
    require_labels: bool = True,
    where: str = "<batch>",
    first_row: int = 0,
) -> list[CandidateList]:
    """The `CandidateList`s of one record batch, as the JSONL/LETOR readers return them.

    `window` is the Top-M asked for now; it may be at most the window the data was converted at
    (`stored_window`): features beyond it were never stored, and nothing is zero-filled.
    """
    rows = _decode_batch(batch, spec, where, first_row)
    out = []
    for r, qid in enumerate(rows.qids):
        n = int(rows.n[r])
        expected = n if stored_window is None else min(stored_window, n)
        if rows.stored[r] != expected:
            raise rows.fail(
                r, "candidate features", f"{rows.stored[r]} stored, window {stored_window} needs {expected}"
            )
        m = n if window is None else min(window, n)
        if m > expected:
            raise rows.fail(
                r,
                f"candidates[{expected}].features",
                f"not stored: the dataset was converted with window {stored_window}; window {window} was asked",
            )
        if len(set(rows.ids[r])) != n:
            dup = next(i for i, c in enumerate(rows.ids[r]) if c in rows.ids[r][:i])
            raise rows.fail(r, f"candidates[{dup}].id", f"duplicate candidate id {rows.ids[r][dup]!r}")
        labels = rows.labels[r]
        if labels is None and require_labels:
            raise rows.fail(r, "candidates[0].label", "missing label (every candidate needs one)")
        out.append(
            CandidateList(
                query_id=qid,
                ids=rows.ids[r],
                upstream=rows.upstream[r].copy(),
                window=m,
                features={g: v[r][:m].copy() for g, v in rows.candidate.items()},
                query_features={g: v[r].copy() for g, v in rows.query.items()},
                labels=None if labels is None else labels.copy(),
            )
        )
    return out


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard, as the manifest lists it."""

    path: str  # relative to the dataset root
    queries: int
    candidates: int
    row_groups: int
    bytes: int


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(
    target: Location,
    lists: Iterable[CandidateList],
    spec: FeatureSpec,
    *,
    window: int | None,
    queries_per_row_group: int = DEFAULT_QUERIES_PER_ROW_GROUP,
) -> ShardInfo:
    """Write one shard from a stream of lists, holding one row group of them in memory at a time.

    The file is complete before its name appears: locally a temporary name in the same directory
    and `os.replace`; on an object store a local temporary file uploaded in one piece.
    """
    schema = arrow_schema(spec, window)
    tmpdir = None
    if target.local:
        os.makedirs(os.path.dirname(target.path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(target.path), f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="cotrr-shard-")
        tmp = os.path.join(tmpdir.name, target.name)
    queries = candidates = groups = 0
    try:
        # Dictionary encoding and statistics only pay off on the id column; on float vectors they
        # cost time and footer size for nothing (no pushdown on embeddings).
        with pq.ParquetWriter(
            tmp, schema, compression="zstd", use_dictionary=False, write_statistics=["query_id"]
        ) as writer:
            for chunk in _chunks(lists, queries_per_row_group):
                writer.write_batch(lists_to_batch(chunk, schema, spec))
                queries, candidates, groups = queries + len(chunk), candidates + sum(map(len, chunk)), groups + 1
        size = os.path.getsize(tmp)
        if target.local:
            os.replace(tmp, target.path)
        else:
            upload_file(Path(tmp), target)
    finally:
        if target.local and os.path.exists(tmp):
            os.unlink(tmp)
        if tmpdir is not None:
            tmpdir.cleanup()
    return ShardInfo(target.name, queries, candidates, groups, size)


def _chunks(items: Iterable[CandidateList], size: int) -> Iterator[list[CandidateList]]:
    chunk: list[CandidateList] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_output(out: Location, *, overwrite: bool) -> None:
    """Refuse to mix a new dataset into an existing one: readers would see stale shards."""
    entries = list_dir(out)
    if not entries:
        return
    if not overwrite:
        names = ", ".join(name for name, _ in entries[:3])
        raise DataError(f"{out.uri} is not empty ({names}{', ...' if len(entries) > 3 else ''}); pass --overwrite")
    foreign = [n for n, is_dir in entries if is_dir or not (n == MANIFEST or n.startswith(("part-", ".part-")))]
    if foreign:
        raise DataError(f"{out.uri} holds {foreign[0]!r}, which is not a shard; refusing to overwrite it")
    delete_file(out.child(MANIFEST))  # first: a half-replaced dataset must never look complete
    for name, _ in entries:
        if name != MANIFEST:
            delete_file(out.child(name))


def write_manifest(
    out: Location, spec: FeatureSpec, window: int | None, shards: list[ShardInfo], source: dict[str, Any]
) -> dict[str, Any]:
    """The dataset's last write: its presence says every listed shard is complete."""
    manifest = {
        **header(spec, window),
        "queries": sum(s.queries for s in shards),
        "candidates": sum(s.candidates for s in shards),
        "shards": [dataclasses.asdict(s) for s in shards],
        "source": source,
    }
    write_bytes(out.child(MANIFEST), json.dumps(manifest, indent=1).encode() + b"\n")
    return manifest


def write_dataset(
    lists: Iterable[CandidateList],
    output: str | Path,
    spec: FeatureSpec,
    *,
    window: int | None,
    queries_per_shard: int = DEFAULT_QUERIES_PER_SHARD,
    queries_per_row_group: int = DEFAULT_QUERIES_PER_ROW_GROUP,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stream `lists` into shards of `queries_per_shard` queries under `output`; returns the manifest."""
    if queries_per_shard < 1 or queries_per_row_group < 1:
        raise ValueError("queries_per_shard and queries_per_row_group must be >= 1")
    out = locate(output)
    check_output(out, overwrite=overwrite)
    stream = iter(lists)
    shards: list[ShardInfo] = []
    while True:
        first = next(stream, None)
        if first is None:
            break
        shard = _take(first, stream, queries_per_shard)
        target = out.child(shard_name(len(shards)))
        shards.append(write_shard(target, shard, spec, window=window, queries_per_row_group=queries_per_row_group))
    if not shards:
        raise DataError(f"{out.uri}: no queries to write")
    return write_manifest(out, spec, window, shards, source or {})


def _take(first: CandidateList, rest: Iterator[CandidateList], count: int) -> Iterator[CandidateList]:
    yield first
    for _ in range(count - 1):
        item = next(rest, None)
        if item is None:
            return
        yield item


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ParquetDataset:
    """A finished dataset whose manifest matches the expected spec. Shards are checked as they open."""

    location: Location
    spec: FeatureSpec
    window: int | None
    manifest: dict[str, Any]

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self.location.filesystem

    @property
    def paths(self) -> list[str]:
        """The shards' paths on `filesystem`, exactly the manifest's (never a directory listing,
        which could hold a stale or unfinished shard): ``ray.data.read_parquet(ds.paths, filesystem=ds.filesystem)``."""
        return [self.location.child(s["path"]).path for s in self.manifest["shards"]]

    @property
    def schema(self) -> pa.Schema:
        return arrow_schema(self.spec, self.window)

    def open_shard(self, index: int) -> pq.ParquetFile:
        """One shard, after checking its schema, metadata and row count against the manifest."""
        entry = self.manifest["shards"][index]
        loc = self.location.child(entry["path"])
        try:
            pf = pq.ParquetFile(self.filesystem.open_input_file(loc.path))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{loc.uri}: cannot open shard listed in {MANIFEST}: {e}") from None
        raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise DataError(f"{loc.uri}: no {METADATA_KEY.decode()} metadata: not written by this converter")
        meta = json.loads(raw)
        _check_header(meta, self.spec, loc.uri)
        if meta["window"] != self.window:
            raise DataError(f"{loc.uri}: converted with window {meta['window']}, the manifest says {self.window}")
        if not pf.schema_arrow.remove_metadata().equals(self.schema.remove_metadata()):
            raise DataError(f"{loc.uri}: schema differs from the one feature spec {self.spec.version!r} defines")
        if pf.metadata.num_rows != entry["queries"]:
            raise DataError(f"{loc.uri}: {pf.metadata.num_rows} rows, {MANIFEST} lists {entry['queries']}")
        return pf

    def iter_batches(
        self, *, columns: list[str] | None = None, batch_size: int = DEFAULT_BATCH_QUERIES
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `batch_size` queries, shard by shard, in manifest order."""
        for i in range(len(self.manifest["shards"])):
            pf = self.open_shard(i)
            try:
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
            finally:
                pf.close()

    def iter_shard_batches(self, index: int, *, batch_size: int = DEFAULT_BATCH_QUERIES) -> Iterator[pa.RecordBatch]:
        pf = self.open_shard(index)
        try:
            yield from pf.iter_batches(batch_size=batch_size)
        finally:
            pf.close()

    def iter_records(
        self, *, window: int | None, require_labels: bool = True, batch_size: int = DEFAULT_BATCH_QUERIES
    ) -> Iterator[CandidateList]:
        """The lists, validated (structure, finiteness, unique candidate ids), one batch in memory at a time."""
        for i, entry in enumerate(self.manifest["shards"]):
            uri, row = self.location.child(entry["path"]).uri, 0
            for batch in self.iter_shard_batches(i, batch_size=batch_size):
                yield from batch_to_lists(
                    batch,
                    self.spec,
                    stored_window=self.window,
                    window=window,
                    require_labels=require_labels,
                    where=uri,
                    first_row=row,
                )
                row += batch.num_rows


def _check_header(meta: dict[str, Any], spec: FeatureSpec, where: str) -> None:
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{where}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this reader reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if meta.get("spec_fingerprint") != spec.fingerprint():
        stored = (meta.get("spec") or {}).get("version", "?")
        raise DataError(
            f"{where}: written for feature spec {stored!r} (fingerprint {str(meta.get('spec_fingerprint'))[:12]}), "
            f"expected {spec.version!r} (fingerprint {spec.fingerprint()[:12]}); convert the data with this spec"
        )


def open_parquet_dataset(uri: str | Path, spec: FeatureSpec) -> ParquetDataset:
    """A dataset written by `write_dataset` (local path or ``s3://``), refused unless it is complete
    (its manifest exists) and was written for `spec` (the fingerprints match)."""
    loc = locate(uri)
    try:
        raw = read_bytes(loc.child(MANIFEST))
    except FileNotFoundError:
        raise DataError(
            f"{loc.uri}: no {MANIFEST}: not a converted dataset, or its conversion did not finish"
        ) from None
    except StorageError as e:
        raise DataError(str(e)) from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{loc.child(MANIFEST).uri}: invalid JSON ({e})") from None
    _check_header(manifest, spec, loc.child(MANIFEST).uri)
    return ParquetDataset(loc, spec, manifest["window"], manifest)


def read_parquet_records(
    uri: str | Path, spec: FeatureSpec, *, window: int | None, require_labels: bool = True
) -> list[CandidateList]:
    """Every list of a Parquet dataset, equal to what `read_jsonl` / `read_letor` return for its source."""
    seen: set[str] = set()
    out = []
    for cl in open_parquet_dataset(uri, spec).iter_records(window=window, require_labels=require_labels):
        if cl.query_id in seen:  # the converter refuses duplicates; a hand-assembled dataset may not
            raise DataError(f"{uri}: query id {cl.query_id!r} appears twice")
        seen.add(cl.query_id)
        out.append(cl)
    if not out:
        raise DataError(f"{uri}: no queries")
    return out


def iter_parquet_batches(
    uri: str | Path, spec: FeatureSpec, *, columns: list[str] | None = None, batch_size: int = DEFAULT_BATCH_QUERIES
) -> Iterator[pa.RecordBatch]:
    """Arrow record batches of a dataset (whole queries, at most `batch_size` a batch), after the
    manifest and each shard's schema are checked; the values were validated when they were written."""
    return open_parquet_dataset(uri, spec).iter_batches(columns=columns, batch_size=batch_size)
