"""The canonical record for one query and its candidate list, in upstream order.

The same schema is a line of a training JSONL file and the body of an HTTP rerank request, so a
candidate featurises identically in training and in serving. Structure is checked here (types,
finiteness of scalars, non-empty list); dimensions and group names depend on the bundle's
`FeatureSpec` and are checked by `features.to_candidate_list`.

Feature vectors are JSON lists of numbers or, the cheaper encoding for large requests, a base64
string of little-endian float32 values.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Vector = list[float] | str
"""A dense vector: a list of numbers, or base64 of little-endian float32."""


class CandidateRecord(BaseModel):
    """One upstream candidate."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=256, description="Candidate id, unique within the list.")
    upstream_score: float = Field(description="Score of the upstream retriever (higher = better).")
    features: dict[str, Vector] | None = Field(
        default=None,
        description="Dense feature groups by name. Required for candidates inside the Top-M window.",
    )
    label: float | None = Field(default=None, ge=0, description="Graded relevance (training data only), e.g. 0..4.")


class QueryRecord(BaseModel):
    """A query and its candidates in upstream order (index 0 = upstream's first)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=256, description="Query id; also the split key.")
    features: dict[str, Vector] = Field(default_factory=dict, description="Query-level dense feature groups by name.")
    candidates: list[CandidateRecord] = Field(min_length=1, description="Candidates in upstream order.")
