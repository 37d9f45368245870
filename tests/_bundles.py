"""Tiny real bundles and rerank request bodies for the serving tests.

`make_bundle` trains a 1-layer, d_model 32 reranker for a few dozen steps on synthetic data and
saves it with `Bundle.save`, so the served artifact is exactly what training produces (checksums,
spec, normaliser, isotonic calibrator), only small. A few seconds on one CPU.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from cotrr_ray.bundles.bundle import Bundle
from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CONTEXT_FEATURES, FeatureNormalizer, pad_lists
from cotrr_ray.core.losses import ranking_loss
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.scoring import predict_logits, to_tensors
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.data.readers import read_jsonl
from cotrr_ray.data.synthetic import generate

TOP_M = 8


def make_data(path: Path, *, queries: int = 150, seed: int = 0) -> Path:
    """Synthetic lists of 12-16 candidates; the first TOP_M carry features (base64)."""
    return generate(path, queries=queries, seed=seed, min_candidates=12, max_candidates=16, top_m=TOP_M, progress=False)


def make_bundle(out: Path, data: Path, *, seed: int = 0, steps: int = 30, top_m: int = TOP_M) -> Path:
    spec = IMAGE_SEARCH_SPEC
    lists = read_jsonl(data, spec, window=top_m)
    train, calib = lists[:110], lists[110:]
    normalizer = FeatureNormalizer(spec).fit(train)
    config = RerankerConfig.from_spec(
        spec,
        context_dim=len(CONTEXT_FEATURES),
        max_list_len=top_m,
        d_model=32,
        n_heads=2,
        n_layers=1,
        ffn_mult=2,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    model = Reranker(config)

    def pad(ls):
        return pad_lists([normalizer.transform(cl) for cl in ls], spec, top_m, labels=[cl.labels for cl in ls])

    padded = pad(train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = padded.take(rng.choice(len(train), 16, replace=False))
        logits = model(**to_tensors(batch, "cpu"))
        loss = ranking_loss("lambda", logits, torch.from_numpy(batch.labels), torch.from_numpy(batch.mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held = pad(calib)
    logits = predict_logits(model, held)
    scores = logits[held.mask]
    labels01 = (held.labels[held.mask] >= 1.0).astype(float)
    calibrator = IsotonicCalibrator(min_samples=1).fit(scores, labels01)
    return Bundle.save(
        out,
        model=model,
        spec=spec,
        normalizer=normalizer,
        calibrator=calibrator,
        relevance_threshold=1.0,
        metrics={"headline": {"note": "test bundle"}},
        train_config={"test_bundle": {"seed": seed, "steps": steps}},
        data_fingerprint=f"test-{seed}",
    )


def read_records(data: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.read_bytes().splitlines() if line.strip()]


def _to_list(v: Any) -> Any:
    if isinstance(v, str):
        return np.frombuffer(base64.b64decode(v), dtype="<f4").astype(float).tolist()
    return v


def request_body(
    record: dict[str, Any],
    *,
    encoding: str = "base64",
    unit_id: str | None = None,
    top_m: int | None = None,
    top_n: int | None = None,
) -> dict[str, Any]:
    """A rerank request (dict) from a generated record: labels dropped, vectors as lists or base64."""
    conv = _to_list if encoding == "list" else (lambda v: v)
    candidates = []
    for c in record["candidates"]:
        c = {k: v for k, v in c.items() if k != "label"}
        if "features" in c:
            c["features"] = {g: conv(v) for g, v in c["features"].items()}
        candidates.append(c)
    body: dict[str, Any] = {
        "query": {"id": record["id"], "features": {g: conv(v) for g, v in record["features"].items()}},
        "candidates": candidates,
    }
    for key, value in (("unit_id", unit_id), ("top_m", top_m), ("top_n", top_n)):
        if value is not None:
            body[key] = value
    return body


def modified(body: dict[str, Any], fn) -> bytes:
    """JSON bytes of a deep copy of `body` after `fn(copy)` edits it in place."""
    b = copy.deepcopy(body)
    fn(b)
    return orjson.dumps(b)
