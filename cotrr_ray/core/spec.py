"""Feature spec: which dense feature groups a query and its candidates carry, as data.

The model, the record validators and the HTTP contract are all built from a `FeatureSpec`, so the
same code trains and serves the image-search spec (CLIP embeddings + visual + conflict features) or
MSLR's 136 LETOR features as one group. A bundle stores the spec it was trained with; a replica
refuses requests that do not match it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GroupTransform = Literal["none", "standardize", "signed_log1p_standardize"]


class FeatureSpec(BaseModel):
    """Ordered feature groups and their dimensions.

    Group order is significant: it is the order in which groups become model inputs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(description="Name/version of this feature set; recorded in the bundle and checked at load.")
    candidate: dict[str, int] = Field(
        description="Per-candidate dense groups, name -> dimension, in model input order."
    )
    query: dict[str, int] = Field(
        default_factory=dict, description="Per-query dense groups, name -> dimension (may be empty)."
    )
    transforms: dict[str, GroupTransform] = Field(
        default_factory=dict,
        description=(
            "Per-group input normalisation fitted on the training split and stored in the bundle, "
            "keyed 'candidate.<group>' or 'query.<group>'. Missing keys mean 'standardize'."
        ),
    )

    @field_validator("candidate", "query")
    @classmethod
    def _positive_dims(cls, groups: dict[str, int]) -> dict[str, int]:
        for name, dim in groups.items():
            if not name or dim < 1:
                raise ValueError(f"feature group {name!r} must have a non-empty name and dim >= 1, got {dim}")
        return groups

    @field_validator("candidate")
    @classmethod
    def _at_least_one_candidate_group(cls, groups: dict[str, int]) -> dict[str, int]:
        if not groups:
            raise ValueError("a feature spec needs at least one candidate group")
        return groups

    @model_validator(mode="after")
    def _transforms_name_known_groups(self) -> FeatureSpec:
        known = {f"candidate.{g}" for g in self.candidate} | {f"query.{g}" for g in self.query}
        unknown = sorted(set(self.transforms) - known)
        if unknown:
            raise ValueError(f"transforms for unknown groups {unknown}; known keys are {sorted(known)}")
        return self

    def transform_for(self, scope: Literal["candidate", "query"], group: str) -> GroupTransform:
        return self.transforms.get(f"{scope}.{group}", "standardize")

    def fingerprint(self) -> str:
        """Stable sha256 of the canonical JSON form; equal specs have equal fingerprints."""
        d = self.model_dump(mode="json")
        # Group order is significant (model input order); transform order is not.
        d["transforms"] = dict(sorted(d["transforms"].items()))
        canonical = json.dumps(d, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> str:
        cand = ", ".join(f"{k}[{v}]" for k, v in self.candidate.items())
        query = ", ".join(f"{k}[{v}]" for k, v in self.query.items()) or "none"
        return f"{self.version}: candidate {cand}; query {query}"


IMAGE_SEARCH_SPEC = FeatureSpec(
    version="image-search-v1",
    candidate={"image_embedding": 512, "text_embedding": 512, "visual": 8, "conflict": 5},
    query={"text_embedding": 512},
    # CLIP vectors arrive L2-normalised; keeping them raw preserves query-image cosine geometry,
    # which the model reads directly. The hand-made statistics get standardised.
    transforms={
        "candidate.image_embedding": "none",
        "candidate.text_embedding": "none",
        "query.text_embedding": "none",
    },
)
"""The default spec: CLIP ViT-B/32 image and caption embeddings, 8 visual-attribute statistics,
5 conflict scores per candidate, and the CLIP text embedding of the query."""
