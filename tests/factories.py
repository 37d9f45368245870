"""Tiny, seeded fixtures shared by the core test modules (specs, records, lists, configs, models).

Everything here is small on purpose: these tests run on a 2-core CPU box with torch at 1 thread.
Import as ``from factories import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import CONTEXT_FEATURES, CandidateList, to_candidate_list
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.schema import QueryRecord
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC, FeatureSpec
from cotrr_ray.data.synthetic import generate_query

TINY_SPEC = FeatureSpec(version="tiny-v1", candidate={"a": 3, "b": 2}, query={"q": 2})
"""A hand-sized spec for validation tests: two candidate groups and one query group."""


def b64(values: Any) -> str:
    """Base64 of little-endian float32, the schema's compact vector encoding."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def tiny_record(n: int = 4, *, query_id: str = "q1", labels: bool = True, seed: int = 0) -> dict:
    """A valid TINY_SPEC record as a JSON-like dict (mutate it to make it invalid)."""
    rng = np.random.default_rng(seed)
    cands = []
    for i in range(n):
        c: dict[str, Any] = {
            "id": f"c{i}",
            "upstream_score": round(1.0 - 0.1 * i, 3),
            "features": {
                "a": [round(float(v), 3) for v in rng.standard_normal(3)],
                "b": [round(float(v), 3) for v in rng.standard_normal(2)],
            },
        }
        if labels:
            c["label"] = float(i % 3)
        cands.append(c)
    return {"id": query_id, "features": {"q": [0.25, -0.5]}, "candidates": cands}


def record(d: dict) -> QueryRecord:
    return QueryRecord.model_validate(d)


def generated_lists(
    n_queries: int,
    *,
    seed: int = 0,
    min_candidates: int = 10,
    max_candidates: int = 14,
    top_m: int = 8,
    spec: FeatureSpec = IMAGE_SEARCH_SPEC,
) -> list[CandidateList]:
    """Synthetic labelled lists straight from the generator (no file round trip)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_queries):
        n = int(rng.integers(min_candidates, max_candidates + 1))
        rec = generate_query(rng, f"g{seed}-{k:05d}", n=n, top_m=top_m)
        out.append(to_candidate_list(QueryRecord.model_validate(rec), spec, window=top_m, require_labels=True))
    return out


def tiny_model_config(spec: FeatureSpec = IMAGE_SEARCH_SPEC, top_m: int = 8, **overrides: Any) -> RerankerConfig:
    kw = {"d_model": 32, "n_heads": 4, "n_layers": 1, "ffn_mult": 2, "dropout": 0.0}
    kw.update(overrides)
    return RerankerConfig.from_spec(spec, context_dim=len(CONTEXT_FEATURES), max_list_len=top_m, **kw)


def tiny_model(config: RerankerConfig | None = None, seed: int = 0, perturb: float = 0.1) -> Reranker:
    """An untrained model; weights perturbed so that scores are far from the near-uniform init."""
    torch.manual_seed(seed)
    model = Reranker(config or tiny_model_config())
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


def tiny_train_config(tmp_path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig sized for CPU tests: d_model 32, 1 layer, top_m 8, a few epochs."""
    base = [
        f"output={tmp_path / 'bundle'}",
        f"data.cache_dir={tmp_path / 'data'}",
        "model.top_m=8",
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_layers=1",
        "model.ffn_mult=2",
        "model.dropout=0.0",
        "optim.batch_size=16",
        "optim.lr=0.003",
        "optim.max_epochs=4",
        "optim.patience=50",
        "optim.amp=none",
        "optim.warmup_frac=0.1",
        "scaling.torch_threads=1",
        "bootstrap_samples=100",
    ]
    return TrainConfig.from_yaml(None, base + list(overrides or []))
