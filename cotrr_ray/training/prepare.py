"""Data preparation in the driver: read, split by query, fit the normaliser on train, pad the Top-M windows.

Also the one place that turns a `TrainConfig` and a feature spec into the model's `RerankerConfig`
(`model_config`), and the one featurise-and-score path for raw lists (`window_logits`), used by
`job.run`, cross-fitting and the quality bench alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import CONTEXT_FEATURES, CandidateList, FeatureNormalizer, PaddedLists, pad_lists
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.scoring import inference_amp, predict_logits
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.readers import file_fingerprint, read_jsonl, read_letor
from cotrr_ray.data.splits import split_by_query


@dataclass
class PreparedData:
    """Everything the loop and the post-training steps need, built once in the driver."""

    spec: FeatureSpec
    normalizer: FeatureNormalizer
    model_config: RerankerConfig
    lists: dict[str, list[CandidateList]]  # split -> raw lists (full length, for evaluation)
    padded: dict[str, PaddedLists]  # split -> normalised Top-M windows
    # `file_fingerprint` of the file the lists came from (None: built from lists in memory); part of
    # each checkpoint's fingerprint, so a rerun on other data never resumes these weights.
    data_fingerprint: str | None = None


def load_lists(cfg: TrainConfig, data_path: str | Path) -> tuple[FeatureSpec, list[CandidateList]]:
    d = cfg.data
    if d.format == "letor":
        from cotrr_ray.data.readers import letor_spec

        spec = letor_spec(d.letor_num_features)
        lists = read_letor(
            data_path,
            num_features=d.letor_num_features,
            upstream_feature=d.letor_upstream_feature,
            window=cfg.model.top_m,
        )
        return spec, lists
    return d.feature_spec, read_jsonl(data_path, d.feature_spec, window=cfg.model.top_m)


def pad_split(lists: list[CandidateList], normalizer: FeatureNormalizer, m: int) -> PaddedLists:
    return pad_lists([normalizer.transform(cl) for cl in lists], normalizer.spec, m, labels=[cl.labels for cl in lists])


def model_config(cfg: TrainConfig, spec: FeatureSpec) -> RerankerConfig:
    """The model's config: input shapes from `spec`, window length `top_m`, the rest from ``cfg.model``."""
    return RerankerConfig.from_spec(
        spec,
        context_dim=len(CONTEXT_FEATURES),
        max_list_len=cfg.model.top_m,
        **cfg.model.model_dump(exclude={"top_m"}),
    )


def prepare_splits(cfg: TrainConfig, spec: FeatureSpec, splits: dict[str, list[CandidateList]]) -> PreparedData:
    """`PreparedData` for given query splits: the part of `prepare_data` after the split.

    Fits the normaliser on ``splits["train"]`` only and pads every non-empty split to ``top_m``.
    """
    if not splits.get("train"):
        raise ValueError("split 'train' is empty")
    normalizer = FeatureNormalizer(spec).fit(splits["train"])
    m = cfg.model.top_m
    padded = {name: pad_split(ls, normalizer, m) for name, ls in splits.items() if ls}
    return PreparedData(spec, normalizer, model_config(cfg, spec), dict(splits), padded)


def all_queries_data(
    cfg: TrainConfig, spec: FeatureSpec, lists: list[CandidateList], data_fingerprint: str | None = None
) -> PreparedData:
    """The final model's data under cross-fitted evaluation (`evaluation.method: cross_fit`): every
    query trains it; the same queries stand in as the loop's validation split, which only records a
    (training-set) curve, since `optim.select: last` keeps the last epoch."""
    data = prepare_splits(cfg, spec, {"train": list(lists), "validation": list(lists)})
    return dataclasses.replace(data, data_fingerprint=data_fingerprint)


def prepare_data(cfg: TrainConfig, data_path: str | Path) -> PreparedData:
    """Load, split by query, fit the normaliser on the training split only, pad every split.

    Under cross-fitted evaluation there is no split: every query is training data (`all_queries_data`)."""
    spec, lists = load_lists(cfg, data_path)
    if cfg.evaluation.method == "cross_fit":
        return all_queries_data(cfg, spec, lists, file_fingerprint(data_path))
    splits = split_by_query(lists, cfg.data.splits, cfg.data.split_salt)
    for name in ("train", "validation"):
        if not splits[name]:
            raise ValueError(f"split {name!r} is empty: {len(lists)} queries are too few for {cfg.data.splits}")
    return dataclasses.replace(prepare_splits(cfg, spec, splits), data_fingerprint=file_fingerprint(data_path))


def window_logits(model: Reranker, lists: list[CandidateList], data: PreparedData) -> list[np.ndarray]:
    """Raw logits of each list's window, featurised with `data`'s normaliser (as the bundle does),
    on the model's device at serving's precision there (`inference_amp`), so that a calibrator
    fitted on them sees the scores a Scorer on that device produces."""
    if not lists:
        return []
    padded = pad_split(lists, data.normalizer, data.model_config.max_list_len)
    device = next(model.parameters()).device
    logits = predict_logits(model, padded, device=device, amp=inference_amp(device))
    return [logits[i, : cl.window] for i, cl in enumerate(lists)]
