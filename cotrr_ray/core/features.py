"""Records -> validated float32 arrays -> normalised, padded model inputs.

This is the one path from a `QueryRecord` to model inputs, used by the training loader and by
the serving router alike, so a candidate featurises identically in both. Nothing is silently
padded, resized, zero-filled or dropped: every problem raises `RecordError` naming the field.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrr_ray.core.schema import QueryRecord, Vector
from cotrr_ray.core.spec import FeatureSpec

NORMALIZED_LIMIT = 1e4
"""Normalised inputs are clipped to +-this many training standard deviations."""

CONTEXT_FEATURES = ("upstream_score", "upstream_score_list_z", "upstream_reciprocal_rank")
"""Per-candidate scalars computed from the upstream list itself (fed to the model's context token)."""


class RecordError(ValueError):
    """A record does not match the schema or the feature spec. `field` is a JSON path."""

    def __init__(self, field: str, message: str, *, query_id: str | None = None):
        self.field = field
        self.message = message
        self.query_id = query_id
        where = f"query {query_id!r}, " if query_id is not None else ""
        super().__init__(f"{where}{field}: {message}")


@dataclass
class CandidateList:
    """One query's list as arrays. Only the first `window` candidates carry features."""

    query_id: str
    ids: list[str]
    upstream: np.ndarray  # (n,) float32, upstream order
    window: int  # Top-M: number of leading candidates the model scores
    features: dict[str, np.ndarray]  # group -> (window, d) float32
    query_features: dict[str, np.ndarray]  # group -> (d,) float32
    labels: np.ndarray | None  # (n,) float32, training data only

    def __len__(self) -> int:
        return len(self.ids)


def labels01(lists: list[CandidateList], threshold: float) -> np.ndarray:
    """0/1 events ``label >= threshold`` of every list's window candidates, concatenated in list order:
    the rows an isotonic calibrator is fitted and evaluated on (the ones that get a probability)."""
    return np.concatenate([cl.labels[: cl.window] >= threshold for cl in lists]).astype(np.float64)  # type: ignore[index]


def decode_vector(value: Vector, dim: int, field: str) -> np.ndarray:
    """A JSON list or base64 little-endian float32 string -> finite (dim,) float32 array."""
    if isinstance(value, str):
        try:
            # a2b_base64 in strict mode rejects what b64decode(validate=True) rejects, a few us faster
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            raise RecordError(field, "is a string but not valid base64") from None
        if len(raw) != 4 * dim:
            raise RecordError(field, f"expected {dim} float32 values ({4 * dim} bytes), got {len(raw)} bytes")
        arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        if len(value) != dim:
            raise RecordError(field, f"expected dimension {dim}, got {len(value)}")
        with np.errstate(over="ignore"):  # overflow to inf is reported below as a field error
            arr = np.asarray(value, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise RecordError(field, f"non-finite value at position {bad} (NaN, Infinity, or beyond float32 range)")
    return arr


def _decode_groups(given: dict[str, Vector] | None, groups: dict[str, int], field: str) -> dict[str, np.ndarray]:
    given = given or {}
    unknown = sorted(set(given) - set(groups))
    if unknown:
        raise RecordError(f"{field}.{unknown[0]}", f"unknown feature group; expected {sorted(groups)}")
    out = {}
    for name, dim in groups.items():
        if name not in given:
            raise RecordError(f"{field}.{name}", "missing feature group")
        out[name] = decode_vector(given[name], dim, f"{field}.{name}")
    return out


def _decode_window_fast(record: QueryRecord, spec: FeatureSpec, m: int) -> dict[str, np.ndarray] | None:
    """The candidate groups of the window as (m, d) float32 arrays in one pass per group, or None.

    The success path of `_decode_groups` per candidate + `np.stack`, minus the per-vector overhead:
    one array conversion (or one base64 join) and one finiteness check per group. It returns None
    at the first thing that is not plainly valid (features missing, other group names, a wrong
    length, invalid base64, a group mixing lists and strings, a non-finite value); the caller then
    runs the per-vector path, which raises the same first error, with the same field and message,
    as it always did. The arrays are identical: the same float32 conversion of the same values.
    """
    cands = record.candidates
    rows = []
    for i in range(m):
        given = cands[i].features
        if given is None or given.keys() != spec.candidate.keys():
            return None
        rows.append(given)
    out = {}
    for name, dim in spec.candidate.items():
        values = [r[name] for r in rows]
        first = values[0]
        if isinstance(first, str):
            arr = base64_rows(values, dim)
            if arr is None:
                return None
        else:
            for v in values:
                if isinstance(v, str) or len(v) != dim:
                    return None
            with np.errstate(over="ignore"):
                arr = np.asarray(values, dtype=np.float32)
            if arr.shape != (m, dim):
                return None
        if not np.isfinite(arr).all():
            return None
        out[name] = arr
    return out


def base64_rows(values: list[Any], dim: int) -> np.ndarray | None:
    """Base64 little-endian float32 strings of `dim` values each as one (len, dim) float32 array, or
    None at the first value that is not such a string (finiteness is the caller's check)."""
    raws = []
    for v in values:
        if type(v) is not str:
            return None
        try:
            raw = binascii.a2b_base64(v, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) != 4 * dim:
            return None
        raws.append(raw)
    return np.frombuffer(b"".join(raws), dtype="<f4").reshape(len(values), dim).astype(np.float32)


def to_candidate_list(
    record: QueryRecord, spec: FeatureSpec, *, window: int | None = None, require_labels: bool = False
) -> CandidateList:
    """Validate a record against `spec` and convert it to arrays.

    `window` is the Top-M: the first `window` candidates must carry every candidate group of the
    spec; features past the window are ignored (the tail is passed through in upstream order).
    """
    try:
        n = len(record.candidates)
        m = n if window is None else min(window, n)
        ids = [c.id for c in record.candidates]
        if len(set(ids)) != n:
            seen: set[str] = set()
            for i, cid in enumerate(ids):
                if cid in seen:
                    raise RecordError(f"candidates[{i}].id", f"duplicate candidate id {cid!r}")
                seen.add(cid)
        query_features = _decode_groups(record.features, spec.query, "query.features")
        features = _decode_window_fast(record, spec, m) if m > 0 else None
        if features is None:  # the per-vector path: the reference, and the one that names the first error
            rows = [
                _decode_groups(record.candidates[i].features, spec.candidate, f"candidates[{i}].features")
                for i in range(m)
            ]
            features = {g: np.stack([r[g] for r in rows]) for g in spec.candidate}
        labels = None
        has_label = [c.label is not None for c in record.candidates]
        if require_labels or any(has_label):
            if not all(has_label):
                i = has_label.index(False)
                raise RecordError(f"candidates[{i}].label", "missing label (every candidate needs one)")
            labels = np.array([c.label for c in record.candidates], dtype=np.float32)
        with np.errstate(over="ignore"):
            upstream = np.array([c.upstream_score for c in record.candidates], dtype=np.float32)
        if not np.isfinite(upstream).all():
            i = int(np.flatnonzero(~np.isfinite(upstream))[0])
            raise RecordError(f"candidates[{i}].upstream_score", "beyond float32 range")
    except RecordError as e:
        raise RecordError(e.field, e.message, query_id=record.id) from None
    return CandidateList(
        query_id=record.id,
        ids=ids,
        upstream=upstream,
        window=m,
        features=features,
        query_features=query_features,
        labels=labels,
    )


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def context_features(upstream: np.ndarray, window: int) -> np.ndarray:
    """(window, 3): raw upstream score, its z-score within the window, 1/(1 + upstream position).

    Computed from the window only, so padding a batch never changes them.
    """
    s = upstream[:window].astype(np.float64)
    z = (s - s.mean()) / (s.std() + 1e-6) if window > 1 else np.zeros_like(s)
    rr = 1.0 / (1.0 + np.arange(window))
    return np.stack([s, z, rr], axis=1).astype(np.float32)


@dataclass(frozen=True)
class Moments:
    """Row count, mean and sum of squared deviations (M2) per column, in float64.

    Two parts merge exactly (Chan, Golub and LeVeque's pairwise update), so a mean and variance over
    rows spread across lists, blocks or machines never needs the rows in one place, and avoids the
    cancellation of a sum-of-squares formula when features have large means.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        if len(x) == 0:
            return cls(0, np.zeros(x.shape[1]), np.zeros(x.shape[1]))
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        n = self.n + other.n
        if self.n == 0 or other.n == 0:
            return other if self.n == 0 else self
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * (other.n / n), self.m2 + other.m2 + delta**2 * (self.n * other.n / n))


class FeatureNormalizer:
    """Per-feature standardisation (optionally after signed log1p), fitted on the training split.

    Persisted as plain JSON in the bundle so serving applies exactly the training transform.
    """

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def _keys(self):
        yield from (("candidate", g) for g in self.spec.candidate)
        yield from (("query", g) for g in self.spec.query)
        yield ("context", "upstream_score")

    def _transform_name(self, scope: str, group: str) -> str:
        if scope == "context":
            return "standardize"
        return self.spec.transform_for(scope, group)  # type: ignore[arg-type]

    def fit(self, lists: list[CandidateList]) -> FeatureNormalizer:
        return self.fit_moments(self.moments(lists))

    def _rows(self, scope: str, group: str, lists: list[CandidateList]) -> np.ndarray:
        """The rows one feature group contributes, as the normaliser sees them (after log1p), float64."""
        if scope == "candidate":
            x = np.concatenate([cl.features[group] for cl in lists])
        elif scope == "query":
            x = np.stack([cl.query_features[group] for cl in lists])
        else:
            x = np.concatenate([cl.upstream[: cl.window] for cl in lists])[:, None]
        x = x.astype(np.float64)
        return _signed_log1p(x) if self._transform_name(scope, group) == "signed_log1p_standardize" else x

    def moments(self, lists: list[CandidateList], chunk: int = 256) -> dict[str, Moments]:
        """Per group, the exact moments of `lists`' rows, `chunk` lists at a time: what one worker or
        one block contributes; `Moments.merge` combines the parts of a distributed fit."""
        out: dict[str, Moments] = {}
        for scope, group in self._keys():
            key = f"{scope}.{group}"
            for i in range(0, len(lists), chunk):
                part = Moments.of(self._rows(scope, group, lists[i : i + chunk]))
                out[key] = out[key].merge(part) if key in out else part
        return out

    def fit_moments(self, moments: dict[str, Moments]) -> FeatureNormalizer:
        """Fit from per-group moments (`moments`, merged over any partition of the training rows)."""
        if not moments or any(m.n == 0 for m in moments.values()):
            raise ValueError("cannot fit a normalizer on zero lists")
        self.stats_: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for scope, group in self._keys():
            m = moments[f"{scope}.{group}"]
            if self._transform_name(scope, group) == "none":
                mean, scale = np.zeros_like(m.mean), np.ones_like(m.mean)
            else:
                mean, std = m.mean, np.sqrt(m.m2 / m.n)
                # Constant features stay constant (centred) instead of exploding.
                scale = np.where(std > 1e-6, std, 1.0)
            self.stats_[f"{scope}.{group}"] = (mean.astype(np.float32), scale.astype(np.float32))
        return self

    def _apply(self, scope: str, group: str, x: np.ndarray) -> np.ndarray:
        mean, scale = self.stats_[f"{scope}.{group}"]
        if self._transform_name(scope, group) == "signed_log1p_standardize":
            x = _signed_log1p(x)
        # Finite but absurd inputs (an upstream score of 1e25) would overflow the model's
        # LayerNorms into NaN; nothing beyond 10^4 training standard deviations carries information.
        z = np.clip((x.astype(np.float64) - mean) / scale, -NORMALIZED_LIMIT, NORMALIZED_LIMIT)
        return z.astype(np.float32)

    def transform(self, cl: CandidateList) -> dict[str, object]:
        """Normalised, unpadded model inputs for one list."""
        ctx = context_features(cl.upstream, cl.window)
        ctx[:, 0] = self._apply("context", "upstream_score", ctx[:, :1])[:, 0]
        return {
            "candidate": {g: self._apply("candidate", g, cl.features[g]) for g in self.spec.candidate},
            "query": {g: self._apply("query", g, cl.query_features[g]) for g in self.spec.query},
            "context": ctx,
        }

    def to_dict(self) -> dict:
        return {
            "format_version": 1,
            "spec_fingerprint": self.spec.fingerprint(),
            "stats": {k: {"mean": m.tolist(), "scale": s.tolist()} for k, (m, s) in self.stats_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, spec: FeatureSpec) -> FeatureNormalizer:
        if d.get("format_version") != 1:
            raise ValueError(f"unsupported normalizer format_version {d.get('format_version')!r}")
        if d.get("spec_fingerprint") != spec.fingerprint():
            raise ValueError("normalizer was fitted for a different feature spec")
        self = cls(spec)
        self.stats_ = {}
        dims = {
            **{f"candidate.{g}": n for g, n in spec.candidate.items()},
            **{f"query.{g}": n for g, n in spec.query.items()},
            "context.upstream_score": 1,
        }
        stats = d.get("stats")
        if not isinstance(stats, dict):
            raise ValueError("normalizer state lacks 'stats'")
        for scope, group in self._keys():
            key = f"{scope}.{group}"
            if not isinstance(stats.get(key), dict) or not {"mean", "scale"} <= set(stats[key]):
                raise ValueError(f"normalizer state lacks {key!r} mean/scale")
            mean = np.asarray(stats[key]["mean"], dtype=np.float32)
            scale = np.asarray(stats[key]["scale"], dtype=np.float32)
            if mean.shape != (dims[key],) or scale.shape != (dims[key],):
                raise ValueError(f"normalizer state for {key!r} has shape {mean.shape}, expected ({dims[key]},)")
            if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
                raise ValueError(f"normalizer state for {key!r} is malformed")
            if (scale <= 0).any():
                raise ValueError(f"normalizer state for {key!r} has a non-positive scale")
            self.stats_[key] = (mean, scale)
        return self


@dataclass
class PaddedLists:
    """A batch of lists padded to M (numpy; converted to tensors at the model boundary)."""

    candidate: dict[str, np.ndarray]  # group -> (B, M, d)
    query: dict[str, np.ndarray]  # group -> (B, d)
    context: np.ndarray  # (B, M, C)
    mask: np.ndarray  # (B, M) bool, True = real candidate
    labels: np.ndarray | None  # (B, M) float32, 0 at padding

    def __len__(self) -> int:
        return self.mask.shape[0]

    def take(self, idx: np.ndarray) -> PaddedLists:
        return PaddedLists(
            candidate={g: v[idx] for g, v in self.candidate.items()},
            query={g: v[idx] for g, v in self.query.items()},
            context=self.context[idx],
            mask=self.mask[idx],
            labels=None if self.labels is None else self.labels[idx],
        )


def pad_lists(
    inputs: list[dict[str, object]], spec: FeatureSpec, m: int, labels: list[np.ndarray] | None = None
) -> PaddedLists:
    """Stack per-list normalised inputs (from `FeatureNormalizer.transform`) into (B, M, ...) arrays."""
    b = len(inputs)
    cand = {g: np.zeros((b, m, d), np.float32) for g, d in spec.candidate.items()}
    query = {g: np.zeros((b, d), np.float32) for g, d in spec.query.items()}
    context = np.zeros((b, m, len(CONTEXT_FEATURES)), np.float32)
    mask = np.zeros((b, m), bool)
    lab = None if labels is None else np.zeros((b, m), np.float32)
    for i, x in enumerate(inputs):
        n = x["context"].shape[0]  # type: ignore[attr-defined]
        if n > m:
            raise ValueError(f"list {i} has {n} candidates in its window, more than M={m}")
        for g in spec.candidate:
            cand[g][i, :n] = x["candidate"][g]  # type: ignore[index]
        for g in spec.query:
            query[g][i] = x["query"][g]  # type: ignore[index]
        context[i, :n] = x["context"]
        mask[i, :n] = True
        if lab is not None:
            lab[i, :n] = labels[i][:n]  # type: ignore[index]
    return PaddedLists(cand, query, context, mask, lab)
