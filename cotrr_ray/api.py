"""The HTTP contract of `POST /v1/rerank` as pydantic models (request, response, error body).

The request reuses the canonical record (`cotrr_ray.schema`): the query is ``{id, features}`` and
each candidate a `CandidateRecord`, so an HTTP candidate featurises exactly like a training row.
Dimensions and group names depend on the served bundle and are checked after parsing by
`features.to_candidate_list` (see `cotrr_ray.serving.RequestParser`). Response models document
the API (OpenAPI at /docs); the router writes plain dicts of the same shape for speed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cotrr_ray.schema import CandidateRecord, QueryRecord, Vector


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
