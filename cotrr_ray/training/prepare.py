"""Data preparation in the driver: read, split by query, fit the normaliser on train, pad the Top-M windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import CONTEXT_FEATURES, CandidateList, FeatureNormalizer, PaddedLists, pad_lists
from cotrr_ray.core.model import RerankerConfig
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.readers import read_jsonl, read_letor
from cotrr_ray.data.splits import split_by_query


@dataclass
class PreparedData:
    """Everything the loop and the post-training steps need, built once in the driver."""

    spec: FeatureSpec
    normalizer: FeatureNormalizer
    model_config: RerankerConfig
    lists: dict[str, list[CandidateList]]  # split -> raw lists (full length, for evaluation)
    padded: dict[str, PaddedLists]  # split -> normalised Top-M windows


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


def prepare_data(cfg: TrainConfig, data_path: str | Path) -> PreparedData:
    """Load, split by query, fit the normaliser on the training split only, pad every split."""
    spec, lists = load_lists(cfg, data_path)
    splits = split_by_query(lists, cfg.data.splits, cfg.data.split_salt)
    for name in ("train", "validation"):
        if not splits[name]:
            raise ValueError(f"split {name!r} is empty: {len(lists)} queries are too few for {cfg.data.splits}")
    normalizer = FeatureNormalizer(spec).fit(splits["train"])
    m = cfg.model.top_m
    model_config = RerankerConfig.from_spec(
        spec,
        context_dim=len(CONTEXT_FEATURES),
        max_list_len=m,
        **cfg.model.model_dump(exclude={"top_m"}),
    )
    padded = {name: pad_split(ls, normalizer, m) for name, ls in splits.items() if ls}
    return PreparedData(spec, normalizer, model_config, splits, padded)
