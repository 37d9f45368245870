"""Dataset readers: JSON Lines (the serving schema) and LETOR/SVMlight, with errors naming file, line and field."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
from pydantic import ValidationError

from cotrr_ray.core.features import CandidateList, RecordError, to_candidate_list
from cotrr_ray.core.schema import QueryRecord
from cotrr_ray.core.spec import FeatureSpec


class DataError(ValueError):
    """A data file cannot be used; the message names the file, line, query and field."""


def _pydantic_field(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    parts = []
    for p in first["loc"]:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        elif p not in ("list[float]", "str"):
            parts.append(str(p))
    return ".".join(parts) or "<root>", first["msg"]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, QueryRecord]]:
    """Yield (line number, record) from a JSON Lines file; blank lines are skipped."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
            try:
                yield lineno, QueryRecord.model_validate(obj)
            except ValidationError as e:
                field, msg = _pydantic_field(e)
                qid = obj.get("id") if isinstance(obj, dict) else None
                raise DataError(f"{path}:{lineno}: query {qid!r}, {field}: {msg}") from None


def iter_jsonl_lists(
    path: str | Path, spec: FeatureSpec, *, window: int | None, require_labels: bool = True
) -> Iterator[tuple[int, CandidateList]]:
    """Yield (line number, validated list) for every query of a JSONL file, one at a time.

    The one JSONL validator: `read_jsonl` and the Parquet converter both run it, so a file fails
    the same way, with the same message, whichever path reads it. Only the query ids seen so far
    are kept (for the duplicate check), never the records.
    """
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path):
        if rec.id in seen:
            raise DataError(f"{path}:{lineno}: query id {rec.id!r} already used on line {seen[rec.id]}")
        seen[rec.id] = lineno
        try:
            yield lineno, to_candidate_list(rec, spec, window=window, require_labels=require_labels)
        except RecordError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not seen:
        raise DataError(f"{path}: no queries")


def read_jsonl(
    path: str | Path, spec: FeatureSpec, *, window: int | None, require_labels: bool = True
) -> list[CandidateList]:
    """Read and validate every query of a JSONL file against `spec`. Fails on the first bad record."""
    return [cl for _, cl in iter_jsonl_lists(path, spec, window=window, require_labels=require_labels)]


def letor_spec(num_features: int = 136, group: str = "letor") -> FeatureSpec:
    """One dense group of LETOR features, signed-log1p + standardised (heavy-tailed counts, BM25...)."""
    return FeatureSpec(
        version=f"letor-{num_features}",
        candidate={group: num_features},
        transforms={f"candidate.{group}": "signed_log1p_standardize"},
    )


def _parse_letor_line(path: str | Path, lineno: int, line: str, num_features: int) -> tuple[str, float, np.ndarray]:
    tok = line.split()
    try:
        label = float(tok[0])
        if not tok[1].startswith("qid:"):
            raise ValueError("second token must be qid:N")
        qid = tok[1][4:]
        x = np.zeros(num_features, np.float32)
        for t in tok[2:]:
            i, v = t.split(":", 1)
            idx = int(i)
            if not 1 <= idx <= num_features:
                raise ValueError(f"feature index {idx} outside 1..{num_features}")
            x[idx - 1] = float(v)
    except (ValueError, IndexError) as e:
        raise DataError(f"{path}:{lineno}: malformed LETOR line ({e})") from None
    if not np.isfinite(x).all() or not np.isfinite(label) or label < 0:
        raise DataError(f"{path}:{lineno}: non-finite feature or invalid label in query {qid!r}")
    return qid, label, x


FILE_ORDER = "file_order"
"""`upstream_feature` value for files whose rows are already in upstream order within each query."""

UpstreamFeature = int | str  # a 1-based feature number, or FILE_ORDER


def check_upstream_feature(upstream_feature: UpstreamFeature, num_features: int) -> None:
    if upstream_feature == FILE_ORDER:
        return
    if isinstance(upstream_feature, bool) or not isinstance(upstream_feature, int):
        raise ValueError(f"upstream_feature must be a feature number or {FILE_ORDER!r}, got {upstream_feature!r}")
    if not 1 <= upstream_feature <= num_features:
        raise ValueError(f"upstream_feature must be in 1..{num_features} or {FILE_ORDER!r}, got {upstream_feature}")


def _letor_list(
    qid: str, rows: list[tuple[float, np.ndarray]], upstream_feature: UpstreamFeature, group: str, window: int | None
) -> CandidateList:
    x = np.stack([r[1] for r in rows])
    labels = np.array([r[0] for r in rows], np.float32)
    if upstream_feature == FILE_ORDER:
        # Rows are in upstream order already; a score that sorts them so (higher = earlier).
        order = np.arange(len(rows))
        upstream = -order.astype(np.float32)
    else:
        order = np.argsort(-x[:, upstream_feature - 1], kind="stable")
        upstream = x[order, upstream_feature - 1].copy()
    x, labels = x[order], labels[order]
    m = len(rows) if window is None else min(window, len(rows))
    return CandidateList(
        query_id=qid,
        ids=[f"{qid}-{int(j)}" for j in order],
        upstream=upstream,
        window=m,
        features={group: x[:m]},
        query_features={},
        labels=labels,
    )


def iter_letor_lists(
    path: str | Path,
    *,
    num_features: int = 136,
    upstream_feature: UpstreamFeature = 110,
    group: str = "letor",
    window: int | None = None,
) -> Iterator[tuple[int, CandidateList]]:
    """Yield (first line, list) for each query of an SVMlight/LETOR file, one query in memory at a time.

    The one LETOR validator (`read_letor` and the Parquet converter both run it). A query's rows
    must be contiguous, as LETOR files write them: a qid that comes back after another query is an
    error naming the line, not a silent merge, so a stream never has to hold the whole file.
    """
    check_upstream_feature(upstream_feature, num_features)
    finished: dict[str, int] = {}  # qid -> its first line, for queries already yielded
    current: str | None = None
    start = 0
    rows: list[tuple[float, np.ndarray]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            qid, label, x = _parse_letor_line(path, lineno, line, num_features)
            if qid != current:
                if current is not None:
                    yield start, _letor_list(current, rows, upstream_feature, group, window)
                    finished[current] = start
                if qid in finished:
                    raise DataError(
                        f"{path}:{lineno}: query {qid!r} is not contiguous: its rows began on line "
                        f"{finished[qid]} and another query came between (LETOR files keep a query's rows together)"
                    )
                current, start, rows = qid, lineno, []
            rows.append((label, x))
    if current is None:
        raise DataError(f"{path}: no rows")
    yield start, _letor_list(current, rows, upstream_feature, group, window)


def read_letor(
    path: str | Path,
    *,
    num_features: int = 136,
    upstream_feature: UpstreamFeature = 110,
    group: str = "letor",
    window: int | None = None,
) -> list[CandidateList]:
    """Read an SVMlight/LETOR file (``label qid:N i:v ... [# comment]``) into candidate lists.

    Features are 1-based; absent indices are 0 (the format is sparse by definition). Query ids are
    whatever follows ``qid:`` (any string without spaces). The upstream order is feature
    `upstream_feature` descending (MSLR: 110 = BM25 of the whole document), ties kept in file order,
    and it is also the `upstream_score`; with ``upstream_feature="file_order"`` the file's row order
    within each query is the upstream order, and the upstream score is minus the row's position
    (0, -1, -2, ...). Each query's rows must be contiguous.
    """
    lists = iter_letor_lists(
        path, num_features=num_features, upstream_feature=upstream_feature, group=group, window=window
    )
    return [cl for _, cl in lists]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a data file: recorded in the bundle, so evaluation can tell a training file apart."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"
