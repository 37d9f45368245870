"""The HTTP contract of `POST /v1/rerank` as pydantic models (request, response, error body).

The request reuses the canonical record (`cotrr_ray.core.schema`): the query is ``{id, features}`` and
each candidate a `CandidateRecord`, so an HTTP candidate featurises exactly like a training row.
Dimensions and group names depend on the served bundle and are checked after parsing by
`features.to_candidate_list` (see `RequestParser` below). Response models document
the API (OpenAPI at /docs); the router writes plain dicts of the same shape for speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from cotrr_ray.core.features import CandidateList, RecordError, to_candidate_list
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


class RequestParser:
    """Body bytes -> `ParsedRequest`, raising `RequestError` for every bad input."""

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
