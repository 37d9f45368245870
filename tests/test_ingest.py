"""The training job's Ray Data path: the Ray-free collate against the in-memory featurisation, then
splits, the distributed normaliser fit, per-rank shards and split scoring through a real local Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from factories import tiny_train_config

from cotrr_ray.core.features import FeatureNormalizer
from cotrr_ray.core.model import Reranker
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC as SPEC
from cotrr_ray.data.collate import batch_moments, normalized_table, padded_batch, padded_prepared, split_mask
from cotrr_ray.data.parquet import batch_to_lists, open_parquet_dataset
from cotrr_ray.data.readers import DataError
from cotrr_ray.data.splits import split_by_query, split_of
from cotrr_ray.data.synthetic import generate, generate_parquet
from cotrr_ray.training.prepare import pad_split, prepare_data, window_logits

SPLITS = {"train": 0.6, "validation": 0.2, "calibration": 0.1, "test": 0.1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # Lists from 3 to 14 candidates around a window of 8: short lists pad, long ones have tails.
    out = tmp_path_factory.mktemp("ingest") / "ds"
    generate_parquet(out, queries=90, shards=3, min_candidates=3, max_candidates=14, top_m=8, queries_per_row_group=16)
    return out


@pytest.fixture(scope="module")
def table(dataset) -> pa.Table:
    return pa.Table.from_batches(list(open_parquet_dataset(dataset, SPEC).iter_batches()))


def _lists(table: pa.Table, window: int) -> list:
    return batch_to_lists(table.combine_chunks().to_batches()[0], SPEC, stored_window=8, window=window)


@pytest.mark.parametrize("window", [8, 5])
def test_padded_batch_equals_the_in_memory_featurisation(table, window) -> None:
    lists = _lists(table, window)
    normalizer = FeatureNormalizer(SPEC).fit(lists)
    ref = pad_split(lists, normalizer, window)
    got = padded_batch(table, normalizer, window=window)
    m = got.mask.shape[1]  # the batch's longest window
    assert m == max(cl.window for cl in lists) and not ref.mask[:, m:].any()
    np.testing.assert_array_equal(got.mask, ref.mask[:, :m])
    for g in SPEC.candidate:
        np.testing.assert_allclose(got.candidate[g], ref.candidate[g][:, :m], atol=1e-6)
    for g in SPEC.query:
        np.testing.assert_allclose(got.query[g], ref.query[g], atol=1e-6)
    np.testing.assert_allclose(got.context, ref.context[:, :m], atol=1e-6)
    np.testing.assert_array_equal(got.labels, ref.labels[:, :m])
    fixed = padded_batch(table, normalizer, window=window, pad_to=window)
    np.testing.assert_allclose(fixed.context, ref.context, atol=1e-6)


def test_prepared_rows_collate_to_the_same_batches(table) -> None:
    # What Ray Data's tasks hand the workers (normalised windows) gathers back into padded_batch's
    # arrays, for any slice a worker's batch may be.
    normalizer = FeatureNormalizer(SPEC).fit(_lists(table, 8))
    rows = normalized_table(table, normalizer, window=8)
    for start, size in ((0, len(table)), (5, 17), (40, 1)):
        ref = padded_batch(table.slice(start, size), normalizer, window=8)
        got = padded_prepared(rows.slice(start, size), SPEC)
        np.testing.assert_array_equal(got.mask, ref.mask)
        for g in SPEC.candidate:
            np.testing.assert_array_equal(got.candidate[g], ref.candidate[g])
        for g in SPEC.query:
            np.testing.assert_array_equal(got.query[g], ref.query[g])
        np.testing.assert_array_equal(got.context, ref.context)
        np.testing.assert_array_equal(got.labels, ref.labels)


def test_batch_moments_merge_to_the_in_memory_fit(table) -> None:
    lists = _lists(table, 8)
    ref = FeatureNormalizer(SPEC).fit(lists)
    parts = [batch_moments(table.slice(i, 7), FeatureNormalizer(SPEC), window=8) for i in range(0, len(lists), 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = {k: merged[k].merge(v) for k, v in p.items()}
    fitted = FeatureNormalizer(SPEC).fit_moments(merged)
    for key, (mean, scale) in ref.stats_.items():
        np.testing.assert_allclose(fitted.stats_[key][0], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fitted.stats_[key][1], scale, rtol=1e-6)


def test_split_mask_is_the_query_hash_split(table) -> None:
    lists = _lists(table, 8)
    splits = split_by_query(lists, SPLITS, "salt-x")
    for name in SPLITS:
        mask = split_mask(table, {name}, SPLITS, "salt-x")
        kept = table.filter(pa.array(mask)).column("query_id").to_pylist()
        assert kept == [cl.query_id for cl in splits[name]]
        assert all(split_of(q, SPLITS, "salt-x") == name for q in kept)


def test_collate_refuses_a_missing_label_and_a_window_the_data_does_not_store(table) -> None:
    normalizer = FeatureNormalizer(SPEC).fit(_lists(table, 8))
    with pytest.raises(DataError, match="not stored"):
        padded_batch(table, normalizer, window=9)
    labels = table.column("label").combine_chunks()
    unlabelled = pa.array([None, *labels.to_pylist()[1:]], labels.type)
    bad = table.set_column(table.schema.get_field_index("label"), "label", unlabelled)
    first = table.column("query_id")[0].as_py()
    with pytest.raises(DataError, match=f"query '{first}', candidates\\[0\\].label: missing label"):
        padded_batch(bad, normalizer, window=8)
    assert padded_batch(bad, normalizer, window=8, labels=False).labels is None


# ----------------------------------------------------------------------------- through Ray


def _cfg(tmp_path: Path, *extra: str):
    return tiny_train_config(
        tmp_path, ["data.splits={train: 0.6, validation: 0.2, calibration: 0.1, test: 0.1}", *extra]
    )


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    return generate(
        tmp_path_factory.mktemp("jsonl") / "d.jsonl",
        queries=120,
        seed=1,
        min_candidates=4,
        max_candidates=12,
        top_m=8,
        progress=False,
    )


@pytest.mark.integration
def test_training_data_counts_and_normaliser_equal_the_in_memory_preparation(local_ray, jsonl, tmp_path) -> None:
    from cotrr_ray.training.ingest import open_training_data, parquet_source

    cfg = _cfg(tmp_path)
    said: list[str] = []
    source = parquet_source(cfg, jsonl, said.append)
    assert said[-1].startswith("converting") and source.fingerprint == prepare_data(cfg, jsonl).data_fingerprint
    assert parquet_source(cfg, jsonl, said.append).dataset.location.uri == source.dataset.location.uri
    assert said[-1].startswith("using converted dataset")  # converted once, reused by content key
    data = open_training_data(cfg, source)
    mem = prepare_data(cfg, jsonl)
    assert data.counts == {k: len(v) for k, v in mem.lists.items()}
    for key, (mean, scale) in mem.normalizer.stats_.items():
        np.testing.assert_allclose(data.normalizer.stats_[key][0], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(data.normalizer.stats_[key][1], scale, rtol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("cached", ["both", "none", "validation"])
def test_in_process_batches_replay_per_epoch_and_cover_the_split(local_ray, jsonl, tmp_path, cached) -> None:
    from ray.data.dataset import MaterializedDataset

    from cotrr_ray.training.ingest import in_process_batches, open_training_data, parquet_source

    cfg = _cfg(
        tmp_path,
        f"data.cache_max_mb={512 if cached == 'both' else 0}",
        "data.shuffle_buffer_queries=50",
        "data.block_queries=16",
    )
    data = open_training_data(cfg, parquet_source(cfg, jsonl, lambda _: None))
    if cached == "validation":  # a limit between the two splits' shares of the source
        data.cache_max_bytes = int(data.split_bytes("validation")) + 1
    expect = {"train": cached == "both", "validation": cached != "none"}
    assert {s: data.cached(s) for s in expect} == expect
    assert {s: isinstance(ds, MaterializedDataset) for s, ds in data.datasets().items()} == expect
    # The converted source is one row group; the workers get it re-blocked to data.block_queries.
    blocks = [t.num_rows for t in data.datasets()["train"].iter_batches(batch_size=None, batch_format="pyarrow")]
    assert max(blocks) == 16 and len(blocks) == -(-sum(blocks) // 16)
    train, val = in_process_batches(cfg, data)

    def order(epoch: int) -> list[str]:
        return [q for t in train.epoch_tables(epoch) for q in t.column("query_id").to_pylist()]

    mem = prepare_data(cfg, jsonl)
    assert sorted(order(0)) == sorted(cl.query_id for cl in mem.lists["train"])
    assert order(0) == order(0) and order(1) == order(1)  # seeded by (seed, rank, epoch): replayable
    assert order(0) != order(1)  # and a new shuffle each epoch
    assert sum(len(b) for b in train.epoch(0)) == train.num_lists == len(mem.lists["train"])
    assert [q for t in val.epoch_tables(0) for q in t.column("query_id").to_pylist()] == [
        cl.query_id for cl in mem.lists["validation"]
    ]


@pytest.mark.integration
def test_split_scoring_equals_the_in_memory_window_logits(local_ray, jsonl, tmp_path) -> None:
    from cotrr_ray.training.ingest import open_training_data, parquet_source, score_split

    cfg = _cfg(tmp_path)
    data = open_training_data(cfg, parquet_source(cfg, jsonl, lambda _: None))
    torch.manual_seed(0)
    model = Reranker(data.model_config).eval()
    queries, logits = score_split(data, ["test", "calibration"], model)
    mem = prepare_data(cfg, jsonl)
    expected = mem.lists["calibration"] + mem.lists["test"]
    by_id = {cl.query_id: cl for cl in expected}
    assert sorted(q.query_id for q in queries) == sorted(by_id)
    ref = dict(zip([cl.query_id for cl in expected], window_logits(model, expected, mem)))
    for q, z in zip(queries, logits):
        np.testing.assert_allclose(z, ref[q.query_id], atol=1e-5)
        np.testing.assert_array_equal(q.labels, by_id[q.query_id].labels)
        assert q.window == by_id[q.query_id].window and len(q) == len(by_id[q.query_id])


def _shard_loop(config: dict) -> None:
    """A Train worker that records what its shards hold: the query ids of two epochs, and its
    validation metric sums for a fixed (seeded) model, all-reduced as `fit` does."""
    import ray.train

    from cotrr_ray.config import TrainConfig
    from cotrr_ray.core.model import RerankerConfig
    from cotrr_ray.core.scoring import predict_logits
    from cotrr_ray.training.ingest import worker_batches
    from cotrr_ray.training.loop import window_ndcg_sums

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train, val = worker_batches(cfg, config["data"], rank, world)
    seen = {e: [q for t in train.epoch_tables(e) for q in t.column("query_id").to_pylist()] for e in (0, 1)}
    torch.manual_seed(0)
    model = Reranker(RerankerConfig.from_dict(config["model_config"])).eval()
    sums = np.zeros(2)
    val_ids = []
    for t in val.epoch_tables(0):
        b = val.collate(t)
        sums += window_ndcg_sums(predict_logits(model, b), b)
        val_ids += t.column("query_id").to_pylist()
    reduced = torch.as_tensor(sums)
    torch.distributed.all_reduce(reduced)
    out = {"train": seen, "val_ids": val_ids, "val_sums": reduced.tolist(), "num_lists": train.num_lists}
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"done": 1})


@pytest.mark.integration
def test_two_workers_read_disjoint_deterministic_shards_and_agree_on_validation(local_ray, jsonl, tmp_path) -> None:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cotrr_ray.core.scoring import predict_logits
    from cotrr_ray.training.ingest import ingest_config, open_training_data, parquet_source
    from cotrr_ray.training.loop import window_ndcg

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = _cfg(tmp_path, "data.shuffle_buffer_queries=30", "data.cache_max_mb=0")  # streamed from Parquet
    data = open_training_data(cfg, parquet_source(cfg, jsonl, lambda _: None))
    trainer = TorchTrainer(
        _shard_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "data": data.loop_config(),
            "model_config": data.model_config.to_dict(),
            "out": str(tmp_path),
        },
        datasets=data.datasets(),
        dataset_config=ingest_config(),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs")),
    )
    assert trainer.fit().error is None
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    mem = prepare_data(cfg, jsonl)
    train_ids = {cl.query_id for cl in mem.lists["train"]}
    for e in ("0", "1"):
        a, b = (set(r["train"][e]) for r in ranks)
        assert not a & b and a | b <= train_ids  # disjoint shards of the training split
        assert len(a) == len(b) == ranks[0]["num_lists"] == len(train_ids) // 2  # equal=True drops the odd one
    for r in ranks:  # the same queries each epoch (deterministic dispatch), in a new order
        assert set(r["train"]["0"]) == set(r["train"]["1"]) and r["train"]["0"] != r["train"]["1"]
    val_ids = ranks[0]["val_ids"] + ranks[1]["val_ids"]
    assert sorted(val_ids) == sorted(cl.query_id for cl in mem.lists["validation"])  # nothing dropped
    torch.manual_seed(0)
    model = Reranker(data.model_config).eval()
    single = window_ndcg(predict_logits(model, mem.padded["validation"]), mem.padded["validation"])
    total, count = ranks[0]["val_sums"]
    assert ranks[1]["val_sums"] == ranks[0]["val_sums"] and total / count == pytest.approx(single, abs=1e-6)
