"""The HTTP contract of `POST /v1/rerank` as pydantic models (request, response, error body).

The request reuses the canonical record (`cotrr_ray.core.schema`): the query is ``{id, features}`` and
each candidate a `CandidateRecord`, so an HTTP candidate featurises exactly like a training row.
Dimensions and group names depend on the served bundle and are checked after parsing by
`features.to_candidate_list` (see `RequestParser` below). Response models document
the API (OpenAPI at /docs); the router writes plain dicts of the same shape for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from cotrr_ray.core.features import CandidateList, RecordError, base64_rows, to_candidate_list
from cotrr_ray.core.schema import CandidateRecord, QueryRecord, Vector
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.serving.errors import RequestError, from_record_error, from_validation_error


class QueryIn(BaseModel):
    """The query: its id and query-level feature groups (e.g. the CLIP text embedding)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=256, description="Query id (also the A/B unit when unit_id is absent).")
    features: dict[str, Vector] = Field(
        default_factory=dict,
        description="Query feature groups by name: a list of numbers or base64 of little-endian float32.",
    )


class RerankRequest(BaseModel):
    """Body of `POST /v1/rerank`. Candidates are in upstream order (index 0 first)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    query: QueryIn
    unit_id: str | None = Field(
        None, max_length=256, description="A/B assignment unit (user or session id); default: the query id."
    )
    candidates: list[CandidateRecord] = Field(
        min_length=1,
        description=(
            "Upstream candidates. The first top_m must carry every candidate feature group of the "
            "bundle; later ones may omit features. `label` is training data and is refused here."
        ),
    )
    top_m: int | None = Field(None, ge=1, description="Top-M window to rerank, 1..the bundle's top_m.")
    top_n: int | None = Field(None, ge=1, description="Return only the first top_n results.")

    def to_record(self) -> QueryRecord:
        """The canonical record (no copy of the candidates; they were validated above)."""
        return QueryRecord.model_construct(id=self.query.id, features=self.query.features, candidates=self.candidates)


class RerankResult(BaseModel):
    id: str
    index: int = Field(description="Upstream position (0-based).")
    rank: int = Field(description="Final position (0-based).")
    score: float | None = Field(description="Raw model logit; null for candidates not reranked.")
    probability: float | None = Field(
        description="Calibrated P(label >= relevance_threshold); null when not reranked or not calibrated."
    )
    reranked: bool = Field(description="True inside the model's Top-M window; false for passthrough.")


class RerankResponse(BaseModel):
    request_id: str
    model_version: str | None = Field(description="Bundle id that ordered the list; null for upstream order.")
    arm: Literal["treatment", "control"]
    shadow: bool = Field(description="Shadow mode: answered by control while the treatment was scored aside.")
    fallback: str | None = Field(description="Why the upstream order was served instead of the model's, if so.")
    calibrated: bool = Field(description="Whether `probability` values are present.")
    results: list[RerankResult]


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request, too_many_candidates.")
    message: str
    field: str | None = Field(description="JSON path of the offending value, e.g. candidates[3].features.visual.")


class ErrorResponse(BaseModel):
    error: ErrorBody


def install_openapi(app: Any, path: str = "/v1/rerank") -> None:
    """Document `RerankRequest` as the body of `path` (the route reads raw bytes for speed)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        body = RerankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["RerankRequest"] = body
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RerankRequest"}}},
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# ----------------------------------------------------------------------------- request parsing


@dataclass
class ParsedRequest:
    query_id: str
    unit_id: str | None
    ids: list[str]  # every candidate, upstream order
    top_n: int | None
    inputs: CandidateList  # the Top-M window only: what the scorer receives

    @property
    def window(self) -> int:
        return self.inputs.window


def window_only(cl: CandidateList) -> CandidateList:
    """The window of `cl` as its own list (drops the tail's ids and scores before the hop)."""
    w = cl.window
    return CandidateList(cl.query_id, cl.ids[:w], cl.upstream[:w], w, cl.features, cl.query_features, None)


_REQUEST_KEYS = frozenset({"query", "unit_id", "candidates", "top_m", "top_n"})
_QUERY_KEYS = frozenset({"id", "features"})
_CANDIDATE_KEYS = frozenset({"id", "upstream_score", "features"})  # a `label` goes the reference way (refused)
_NUMBER_KINDS = frozenset("fiu")


def _is_id(x: Any) -> bool:
    return type(x) is str and 1 <= len(x) <= 256


def _is_number(x: Any) -> bool:
    """A JSON number pydantic's `float` takes as is (no bool, no numeric string); finite."""
    t = type(x)
    return t is int or (t is float and math.isfinite(x))


def _is_count(x: Any, hi: int) -> bool:
    return x is None or (type(x) is int and 1 <= x <= hi)


def _number_array(values: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """`values` (a vector, or a list of vectors) as float32 of `shape`, the way pydantic's
    `list[float]` + `np.asarray(..., float32)` makes it (each number to float64, then float32), or None
    when it holds anything but JSON numbers or is not finite in float32.

    numpy's own dtype discovery does the type check in C: a string, null, object or nested list
    gives a non-numeric dtype or another shape. Only a bool among numbers converts silently (to
    0 or 1), so the few elements equal to 0 or 1 are looked at one by one."""
    if type(values) is not list:
        return None
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.shape != shape or arr.dtype.kind not in _NUMBER_KINDS:
        return None
    for k in np.flatnonzero((arr == 0) | (arr == 1)).tolist():
        row, col = divmod(k, shape[-1])
        if type(values[row][col] if len(shape) == 2 else values[k]) is bool:
            return None
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf: declined below (the reference names it)
        out = arr.astype(np.float64, copy=False).astype(np.float32)
    return out if np.isfinite(out).all() else None


def _base64_rows(values: list[Any], dim: int) -> np.ndarray | None:
    """`features.base64_rows`, and None unless every value is finite."""
    arr = base64_rows(values, dim)
    return arr if arr is not None and np.isfinite(arr).all() else None


def _tail_features_ok(f: Any) -> bool:
    """The features of a candidate outside the window: unused, but pydantic validates them (None or
    a dict of Vectors: base64 strings or lists of finite numbers)."""
    if f is None:
        return True
    if type(f) is not dict:
        return False
    return all(type(v) is str or (type(v) is list and all(_is_number(x) for x in v)) for v in f.values())


class RequestParser:
    """Body bytes -> `ParsedRequest`, raising `RequestError` for every bad input.

    Two paths, one contract. `parse_fast` reads the body with orjson and builds the float32 arrays
    the model needs straight from the JSON values, checking by hand exactly what the pydantic model
    and `to_candidate_list` check; it only ever answers for a body that is valid in every respect and
    declines (None) at the first doubt. `parse_validated` is the reference: pydantic's validation and
    `features.to_candidate_list`, which raise the 4xx naming the field. `parse` tries the first and
    falls back to the second, so a bad body gets exactly the reference's error, and a good one the
    reference's arrays (tests/test_api.py and tests/test_fuzz.py compare the two paths).
    """

    def __init__(self, spec: FeatureSpec, *, max_top_m: int, max_candidates: int):
        self.spec = spec
        self.max_top_m = max_top_m
        self.max_candidates = max_candidates
        self._model = create_model(
            "RerankRequestLimited",
            __base__=RerankRequest,
            candidates=(list[CandidateRecord], Field(min_length=1, max_length=max_candidates)),
        )

    def parse(self, body: bytes, *, default_top_m: int) -> ParsedRequest:
        fast = self.parse_fast(body, default_top_m=default_top_m)
        return fast if fast is not None else self.parse_validated(body, default_top_m=default_top_m)

    def parse_fast(self, body: bytes, *, default_top_m: int) -> ParsedRequest | None:
        """The request of a fully valid body, read with orjson into arrays; None for anything else."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(doc) is not dict or not doc.keys() <= _REQUEST_KEYS:
            return None
        query, cands = doc.get("query"), doc.get("candidates")
        unit_id, top_m, top_n = doc.get("unit_id"), doc.get("top_m"), doc.get("top_n")
        if type(query) is not dict or not query.keys() <= _QUERY_KEYS or not _is_id(query.get("id")):
            return None
        if type(cands) is not list or not 1 <= len(cands) <= self.max_candidates:
            return None
        if not (unit_id is None or (type(unit_id) is str and len(unit_id) <= 256)):
            return None
        if not _is_count(top_m, self.max_top_m) or not _is_count(top_n, self.max_candidates):
            return None
        n = len(cands)
        m = min(top_m or default_top_m, n)
        # Whole-list checks (C loops over the 100s of candidates, not a Python loop per field).
        if set(map(type, cands)) != {dict} or not all(c.keys() <= _CANDIDATE_KEYS for c in cands):
            return None
        ids = [c.get("id") for c in cands]
        if set(map(type, ids)) != {str} or min(map(len, ids)) < 1 or max(map(len, ids)) > 256 or len(set(ids)) != n:
            return None
        tail = [c.get("features") for c in cands[m:]]
        if tail.count(None) != len(tail) and not all(_tail_features_ok(f) for f in tail):
            return None
        spec = self.spec
        qf = query.get("features", {})
        if type(qf) is not dict or qf.keys() != spec.query.keys():
            return None
        query_features = {}
        for g, d in spec.query.items():
            v = qf[g]
            arr = _base64_rows([v], d) if type(v) is str else _number_array(v, (d,))  # None: not a list
            if arr is None:
                return None
            query_features[g] = arr.reshape(d)
        window = [cands[i].get("features") for i in range(m)]
        if any(type(f) is not dict or f.keys() != spec.candidate.keys() for f in window):
            return None
        features = {}
        for g, d in spec.candidate.items():
            values = [f[g] for f in window]
            if type(values[0]) is str:
                arr = _base64_rows(values, d)
            elif all(type(v) is list for v in values):
                arr = _number_array(values, (m, d))
            else:
                return None
            if arr is None:
                return None
            features[g] = arr
        upstream = _number_array([c.get("upstream_score") for c in cands], (n,))
        if upstream is None:
            return None
        cl = CandidateList(query["id"], ids[:m], upstream[:m], m, features, query_features, None)
        return ParsedRequest(query["id"], unit_id, ids, top_n, cl)

    def parse_validated(self, body: bytes, *, default_top_m: int) -> ParsedRequest:
        """The reference path: pydantic validation, then `to_candidate_list`; every error a 4xx."""
        try:
            req = self._model.model_validate_json(body)
        except ValidationError as e:
            # The length bound is checked before any candidate is validated, so an oversized list
            # costs a JSON scan, not per-candidate validation, before its 413.
            for err in e.errors():
                if err["type"] == "too_long" and tuple(err["loc"]) == ("candidates",):
                    n = err.get("ctx", {}).get("actual_length")
                    raise RequestError(
                        "too_many_candidates",
                        f"{n} candidates, more than the maximum of {self.max_candidates}",
                        "candidates",
                    ) from None
            raise from_validation_error(e) from None
        if req.top_m is not None and req.top_m > self.max_top_m:
            raise RequestError("invalid_request", f"top_m must be in 1..{self.max_top_m}, got {req.top_m}", "top_m")
        if req.top_n is not None and req.top_n > self.max_candidates:
            raise RequestError(
                "invalid_request", f"top_n must be in 1..{self.max_candidates}, got {req.top_n}", "top_n"
            )
        for i, c in enumerate(req.candidates):
            if c.label is not None:
                raise RequestError(
                    "invalid_request", "labels are training data and are not accepted here", f"candidates[{i}].label"
                )
        try:
            cl = to_candidate_list(req.to_record(), self.spec, window=req.top_m or default_top_m)
        except RecordError as e:
            raise from_record_error(e) from None
        return ParsedRequest(req.query.id, req.unit_id, cl.ids, req.top_n, window_only(cl))


async def read_body(request: Any, limit: int) -> bytes:
    """The raw body of a Starlette request, refusing more than `limit` bytes before parsing."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("invalid_request", "content-length is not an integer", None) from None
        if size > limit:
            raise RequestError("body_too_large", f"body of {size} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
