"""Arrow record batches of the Parquet format -> what training needs, vectorised and Ray-free.

What a Ray Data block or a Train worker's batch turns into, without building a `CandidateList` per
query (a Python loop per list ran the Ray Data loop at 0.27x the in-memory one):

- `padded_batch`: normalised, padded model inputs (`PaddedLists`), the same arrays
  ``pad_split(batch_to_lists(...), normalizer, m)`` gives, padded to the batch's longest window
  (short lists do not pay for `top_m` positions; the model masks padding either way);
- `batch_moments`: the exact per-group moments of the rows the normaliser is fitted on, one block's
  share of a distributed fit (`core.features.Moments`, merged on the driver);
- `split_mask`: the query-level split of each row, by the same hash as `data.splits.split_of`.

Columns read: ``query_id``, ``upstream_score``, ``label`` and the feature groups; never
``candidate_ids`` (strings, unused by training), so a reader can project it away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cotrr_ray.core.features import CONTEXT_FEATURES, FeatureNormalizer, Moments, PaddedLists, _signed_log1p
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.readers import DataError
from cotrr_ray.data.splits import split_of

TRAINING_COLUMNS_FIXED = ("query_id", "upstream_score", "label")


def training_columns(spec: FeatureSpec) -> list[str]:
    """The columns `padded_batch`, `batch_moments` and `split_mask` read (a projection for the reader)."""
    return [*TRAINING_COLUMNS_FIXED, *(f"candidate.{g}" for g in spec.candidate), *(f"query.{g}" for g in spec.query)]


def as_record_batch(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
        return batch.to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    return batch


@dataclass
class _Windows:
    """Where each row's window lies in the flattened candidate columns."""

    qids: pa.Array
    n: np.ndarray  # candidates per row
    m: np.ndarray  # window per row: min(window, n)
    mask: np.ndarray  # (B, M) True at a window position
    width: int  # M: the longest window of the batch (or the fixed pad length)

    def flat(self, lengths: np.ndarray) -> np.ndarray:
        """Flat indices (row-major over `mask`) into a list column whose rows have `lengths` values."""
        starts = np.cumsum(lengths) - lengths
        return (starts[:, None] + np.arange(self.width)[None, :])[self.mask]

    def fail(self, row: int, field: str, message: str) -> DataError:
        return DataError(f"query {self.qids[row].as_py()!r}, {field}: {message}")


def _lengths(col: pa.Array) -> np.ndarray:
    return col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def _windows(batch: pa.RecordBatch, window: int, pad_to: int | None) -> _Windows:
    n = _lengths(batch.column("upstream_score"))
    m = np.minimum(n, window)
    width = int(m.max(initial=0)) if pad_to is None else pad_to
    if pad_to is not None and (m > pad_to).any():
        raise ValueError(f"a window of {int(m.max())} candidates does not fit pad_to={pad_to}")
    mask = np.arange(width)[None, :] < m[:, None]
    return _Windows(batch.column("query_id"), n, m, mask, width)


def _group_values(batch: pa.RecordBatch, w: _Windows, group: str, dim: int) -> np.ndarray:
    """The window rows of one candidate feature group, (sum of m, dim), in `w.mask` order."""
    col = batch.column(f"candidate.{group}")
    stored = _lengths(col)
    short = w.m > stored
    if short.any():
        r = int(np.flatnonzero(short)[0])
        raise w.fail(
            r, f"candidates[{int(stored[r])}].features.{group}", "not stored (the dataset's window is shorter)"
        )
    values = col.flatten().flatten().to_numpy().reshape(-1, dim)
    return values[w.flat(stored)]


def _labels(batch: pa.RecordBatch, w: _Windows) -> np.ndarray:
    col = batch.column("label")
    if col.null_count:
        r = int(np.flatnonzero(~col.is_valid().to_numpy(zero_copy_only=False))[0])
        raise w.fail(r, "candidates[0].label", "missing label (training needs every label)")
    return col.flatten().to_numpy()[w.flat(_lengths(col))]


def _check_finite(w: _Windows, values: np.ndarray, field: str) -> None:
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        row = int(np.repeat(np.arange(len(w.m)), w.m)[np.flatnonzero(bad)[0]])
        raise w.fail(row, field, "non-finite value")


def padded_batch(
    batch: pa.RecordBatch | pa.Table,
    normalizer: FeatureNormalizer,
    *,
    window: int,
    pad_to: int | None = None,
    labels: bool = True,
) -> PaddedLists:
    """Normalised model inputs of a batch of rows, padded to its longest window (or `pad_to`).

    Equal to ``pad_split(batch_to_lists(batch, ...), normalizer, M)`` on the first M positions
    (tested): the context features are computed per window exactly as `context_features` does."""
    batch = as_record_batch(batch)
    spec = normalizer.spec
    w = _windows(batch, window, pad_to)
    b, width = len(w.m), w.width
    candidate = {}
    for g, d in spec.candidate.items():
        rows = _group_values(batch, w, g, d)
        _check_finite(w, rows, f"features.{g}")
        out = np.zeros((b, width, d), np.float32)
        out[w.mask] = normalizer._apply("candidate", g, rows)
        candidate[g] = out
    query = {}
    for g, d in spec.query.items():
        rows = batch.column(f"query.{g}").flatten().to_numpy().reshape(-1, d)
        if not np.isfinite(rows).all():
            raise w.fail(
                int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0]), f"query.features.{g}", "non-finite value"
            )
        query[g] = normalizer._apply("query", g, rows)
    up = batch.column("upstream_score").flatten().to_numpy()[w.flat(w.n)].astype(np.float64)
    _check_finite(w, up, "upstream_score")
    context = np.zeros((b, width, len(CONTEXT_FEATURES)), np.float32)
    s = np.zeros((b, width), np.float64)
    s[w.mask] = up
    m = np.maximum(w.m, 1)[:, None]
    mean = s.sum(axis=1, keepdims=True) / m
    std = np.sqrt((((s - mean) * w.mask) ** 2).sum(axis=1, keepdims=True) / m)
    z = np.where(w.m[:, None] > 1, (s - mean) / (std + 1e-6), 0.0)
    raw = s.astype(np.float32)[w.mask]
    context[..., 0][w.mask] = normalizer._apply("context", "upstream_score", raw[:, None])[:, 0]
    context[..., 1][w.mask] = z[w.mask].astype(np.float32)
    context[..., 2] = np.where(w.mask, (1.0 / (1.0 + np.arange(width)))[None, :], 0.0).astype(np.float32)
    lab = None
    if labels:
        lab = np.zeros((b, width), np.float32)
        lab[w.mask] = _labels(batch, w)
    return PaddedLists(candidate, query, context, w.mask, lab)


def normalized_table(batch: pa.RecordBatch | pa.Table, normalizer: FeatureNormalizer, *, window: int) -> pa.Table:
    """The rows as the model sees them, still one row per query: each window's normalised candidate
    features (``x.candidate.<g>``), context features (``x.context``) and labels (``x.label``), and the
    normalised query vectors (``x.query.<g>``). What Ray Data's preprocessing tasks hand the Train
    workers, whose collate (`padded_prepared`) then only gathers and pads."""
    p = padded_batch(batch, normalizer, window=window)
    assert p.labels is not None
    m = p.mask.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(m)]).astype(np.int32))

    def windows(x: np.ndarray) -> pa.Array:  # (B, M, d) -> list<fixed_size_list<float32, d>>
        d = x.shape[-1]
        rows = pa.FixedSizeListArray.from_arrays(pa.array(x[p.mask].reshape(-1)), d)
        return pa.ListArray.from_arrays(offsets, rows)

    cols: dict[str, pa.Array] = {"query_id": as_record_batch(batch).column("query_id")}
    cols.update({f"x.candidate.{g}": windows(v) for g, v in p.candidate.items()})
    cols.update(
        {
            f"x.query.{g}": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
            for g, v in p.query.items()
        }
    )
    cols["x.context"] = windows(p.context)
    cols["x.label"] = pa.ListArray.from_arrays(offsets, pa.array(p.labels[p.mask]))
    return pa.table(cols)


def padded_prepared(table: pa.RecordBatch | pa.Table, spec: FeatureSpec) -> PaddedLists:
    """`PaddedLists` of `normalized_table` rows, padded to the batch's longest window: a gather."""
    batch = as_record_batch(table)
    ctx = batch.column("x.context")
    m = _lengths(ctx)
    width = int(m.max(initial=0))
    mask = np.arange(width)[None, :] < m[:, None]
    flat = (np.cumsum(m) - m)[:, None] + np.arange(width)[None, :]
    flat = flat[mask]
    b = len(m)

    def gather(col: pa.Array, d: int) -> np.ndarray:
        out = np.zeros((b, width, d), np.float32)
        out[mask] = col.flatten().flatten().to_numpy().reshape(-1, d)[flat]
        return out

    candidate = {g: gather(batch.column(f"x.candidate.{g}"), d) for g, d in spec.candidate.items()}
    query = {g: batch.column(f"x.query.{g}").flatten().to_numpy().reshape(-1, d).copy() for g, d in spec.query.items()}
    labels = np.zeros((b, width), np.float32)
    labels[mask] = batch.column("x.label").flatten().to_numpy()[flat]
    return PaddedLists(candidate, query, gather(ctx, len(CONTEXT_FEATURES)), mask, labels)


def batch_moments(
    batch: pa.RecordBatch | pa.Table, normalizer: FeatureNormalizer, *, window: int
) -> dict[str, Moments]:
    """Per group, the exact moments of the rows `FeatureNormalizer.fit` sees for these queries
    (window candidates, the query vectors, the window's upstream scores), after signed log1p where
    the spec says so; `Moments.merge` sums blocks into the whole split's."""
    batch = as_record_batch(batch)
    spec = normalizer.spec
    w = _windows(batch, window, None)

    def moments(scope: str, group: str, x: np.ndarray) -> Moments:
        x = x.astype(np.float64)
        if normalizer._transform_name(scope, group) == "signed_log1p_standardize":
            x = _signed_log1p(x)
        return Moments.of(x)

    out = {f"candidate.{g}": moments("candidate", g, _group_values(batch, w, g, d)) for g, d in spec.candidate.items()}
    for g, d in spec.query.items():
        out[f"query.{g}"] = moments("query", g, batch.column(f"query.{g}").flatten().to_numpy().reshape(-1, d))
    up = batch.column("upstream_score").flatten().to_numpy()[w.flat(w.n)]
    out["context.upstream_score"] = moments("context", "upstream_score", up[:, None])
    return out


def moments_to_row(moments: dict[str, Moments]) -> dict[str, list]:
    """`batch_moments` as one Ray Data row (plain lists; merged on the driver by `moments_from_rows`)."""
    return {
        "keys": [list(moments)],
        "n": [[m.n for m in moments.values()]],
        "mean": [[m.mean.tolist() for m in moments.values()]],
        "m2": [[m.m2.tolist() for m in moments.values()]],
    }


def merge_moment_rows(rows: list[dict]) -> dict[str, Moments]:
    """The merged moments of `moments_to_row` rows, in the rows' order (deterministic)."""
    total: dict[str, Moments] = {}
    for row in rows:
        for key, n, mean, m2 in zip(row["keys"], row["n"], row["mean"], row["m2"]):
            part = Moments(int(n), np.asarray(mean, np.float64), np.asarray(m2, np.float64))
            total[key] = total[key].merge(part) if key in total else part
    return total


def split_mask(batch: pa.RecordBatch | pa.Table, names: set[str], fractions: dict[str, float], salt: str) -> np.ndarray:
    """True for the rows whose query falls in one of the splits `names` (`data.splits.split_of`)."""
    qids = batch.column("query_id").to_pylist()
    return np.fromiter((split_of(q, fractions, salt) in names for q in qids), bool, len(qids))
