"""Synthetic rerank request bodies (queries the model never saw, labels removed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

ENCODINGS = ("json", "base64")  # feature encodings of the serving bench's bodies


@dataclass
class Body:
    raw: bytes
    ids: list[str]
    window: int  # Top-M the router will use (routing top_m, capped by the list length)


def synthetic_bodies(
    *,
    n_bodies: int,
    n_candidates: int,
    top_m: int,
    seed: int,
    encoding: str = "base64",
    per_body_seed: bool = False,
    query_prefix: str = "q",
    unit_prefix: str = "u",
) -> list[Body]:
    """`n_bodies` distinct rerank requests: `n_candidates` in upstream order, the first `top_m` with
    features (base64 little-endian float32 for "base64", lists of floats otherwise), the rest ids only.
    `per_body_seed`: body k draws from its own generator seeded [seed, k] (stable under `n_bodies`);
    otherwise all bodies draw in turn from one generator seeded `seed`."""
    from cotrr_ray.data.synthetic import generate_query
    from cotrr_ray.serving.client import request_from_record

    shared = None if per_body_seed else np.random.default_rng(seed)
    out = []
    for k in range(n_bodies):
        rng = np.random.default_rng([seed, k]) if shared is None else shared
        rec = generate_query(
            rng,
            f"{query_prefix}{k}",
            n=n_candidates,
            top_m=top_m,
            encoding="base64" if encoding == "base64" else "list",
        )
        body, _ = request_from_record(rec, unit_id=f"{unit_prefix}{k}")
        out.append(Body(orjson.dumps(body), [c["id"] for c in rec["candidates"]], min(top_m, n_candidates)))
    return out


def body_from_dict(body: dict[str, Any], window: int) -> Body:
    ids = [c["id"] for c in body["candidates"]]
    return Body(orjson.dumps(body), ids, min(body.get("top_m") or window, len(ids)))
