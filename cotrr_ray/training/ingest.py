"""The training job's data path on Ray Data: Parquet -> query-level splits -> normaliser -> Train shards.

    source = parquet_source(cfg, data_path, say)          # a converted dataset (JSONL/LETOR are converted once, cached)
    data = open_training_data(cfg, source)                # Ray Datasets per split, normaliser fitted on train
    TorchTrainer(..., datasets=data.datasets(), dataset_config=ingest_config())
        -> each worker: ShardBatches(ray.train.get_dataset_shard("train"), ...)
    score_split(data, "test", state)                      # Ray Data batch inference, actor pool

Nothing here collects feature rows on the driver: the splits are lazy Ray Datasets over the
manifest's shards; the normaliser's moments, the split counts and the scored rows (window logits
and labels, a few hundred bytes a query) are all that comes back. Every transform is a plain
function of `cotrr_ray.data.collate`, tested without Ray.

**Determinism.** Splits are by the query-id hash (`data.splits.split_of`), so a query lands in the
split it always did. Train shards come from `streaming_split(equal=True)` under `preserve_order`,
which turns Ray Data's dispatcher deterministic (it ignores locality then and gives each block to
the rank that has received the fewest rows), and each rank's epoch is shuffled by a local buffer
seeded by (seed, rank, epoch): a rerun, or a worker group restarted from a checkpoint, replays the
same batches. Validation is split with ``equal=False`` (nothing dropped), each rank's metric sums
all-reduced.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import FeatureNormalizer, PaddedLists
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.data.collate import (
    as_record_batch,
    batch_moments,
    merge_moment_rows,
    moments_to_row,
    normalized_table,
    padded_batch,
    padded_prepared,
    split_mask,
    training_columns,
)
from cotrr_ray.data.parquet import MANIFEST, ParquetDataset, open_parquet_dataset
from cotrr_ray.data.readers import file_fingerprint
from cotrr_ray.storage import read_bytes
from cotrr_ray.training.loop import epoch_seed
from cotrr_ray.training.prepare import model_config

logger = logging.getLogger(__name__)

SCORE_BATCH = 256  # lists per model call when scoring a split


# ----------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Source:
    """The Parquet dataset a run reads, and the fingerprint its checkpoints and bundle record."""

    dataset: ParquetDataset
    fingerprint: str  # file_fingerprint of a JSONL/LETOR input; the manifest's sha256 for Parquet

    @property
    def spec(self) -> FeatureSpec:
        return self.dataset.spec


def _converted_key(cfg: TrainConfig, fingerprint: str, spec: FeatureSpec) -> str:
    d = cfg.data
    parts = [fingerprint, d.format, spec.fingerprint(), str(cfg.model.top_m)]
    if d.format == "letor":
        parts += [str(d.letor_num_features), str(d.letor_upstream_feature)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def parquet_source(cfg: TrainConfig, data_path: str | Path, say: Callable[[str], None] = print) -> Source:
    """The run's dataset. ``data.format: parquet`` reads `data_path` (local or s3://) as it is;
    a JSONL or LETOR file is converted once (streaming, `cotrr_ray.data.convert`) into
    ``<data.cache_dir>/parquet-<key>``, keyed by the file's sha256, the spec, the window and the
    LETOR options, and reused while the file is unchanged."""
    from cotrr_ray.data.convert import convert
    from cotrr_ray.data.readers import letor_spec

    d = cfg.data
    if d.format == "parquet":
        spec = d.feature_spec
        ds = open_parquet_dataset(str(data_path), spec)
        manifest = read_bytes(ds.location.child(MANIFEST))
        return Source(ds, f"parquet-manifest:sha256:{hashlib.sha256(manifest).hexdigest()}")
    spec = letor_spec(d.letor_num_features) if d.format == "letor" else d.feature_spec
    fingerprint = file_fingerprint(data_path)
    out = Path(d.cache_dir) / f"parquet-{_converted_key(cfg, fingerprint, spec)}"
    if (out / MANIFEST).exists():
        say(f"using converted dataset {out}")
    else:
        say(f"converting {data_path} -> {out} (Parquet)")
        convert(
            data_path,
            out,
            format=d.format,
            spec=spec if d.format == "jsonl" else None,
            window=cfg.model.top_m,
            letor_num_features=d.letor_num_features,
            letor_upstream_feature=d.letor_upstream_feature,
            overwrite=True,  # a directory without a manifest is an interrupted conversion
        )
    return Source(open_parquet_dataset(out, spec), fingerprint)


# ----------------------------------------------------------------------------- splits and the normaliser


def _keep_split(batch: pa.Table, names: list[str], fractions: dict[str, float], salt: str) -> pa.Table:
    return batch.filter(pa.array(split_mask(batch, set(names), fractions, salt)))


def _normalize(batch: pa.Table, spec: dict, normalizer: dict, window: int) -> pa.Table:
    """Ray Data's preprocessing of training rows: normalised, windowed model inputs (`normalized_table`)."""
    norm = FeatureNormalizer.from_dict(normalizer, FeatureSpec.model_validate(spec))
    return normalized_table(batch, norm, window=window)


def prepared(ds: Any, spec: FeatureSpec, normalizer: FeatureNormalizer, window: int, block_queries: int) -> Any:
    """`ds`'s rows as the workers train on them, normalised by Ray Data's tasks (not the trainers),
    in blocks of at most `block_queries` rows. Without the re-blocking a block is one of the source's
    row groups (whatever its writer chose, easily 100k rows), and a worker's shuffle buffer takes a
    whole block at a time: its memory would be set by the source's layout, not by our settings."""
    out = ds.map_batches(
        _normalize,
        fn_kwargs={"spec": spec.model_dump(mode="json"), "normalizer": normalizer.to_dict(), "window": window},
        batch_format="pyarrow",
    )
    # Streaming (no shuffle) and order-preserving, so the shards stay deterministic.
    return out.repartition(target_num_rows_per_block=block_queries) if block_queries else out


def _split_stats(
    batch: pa.Table, fractions: dict[str, float], salt: str, fit_on: list[str], spec: dict, window: int
) -> pa.Table:
    """One block's split counts and the moments of its `fit_on` rows (a Ray Data map)."""
    from cotrr_ray.data.splits import split_of

    normalizer = FeatureNormalizer(FeatureSpec.model_validate(spec))
    splits = [split_of(q, fractions, salt) for q in batch.column("query_id").to_pylist()]
    counts = {name: splits.count(name) for name in fractions}
    train = batch.filter(pa.array([s in fit_on for s in splits]))
    row: dict[str, Any] = {"counts": [[counts[n] for n in fractions]]}
    row.update(moments_to_row(batch_moments(train, normalizer, window=window)))  # n = 0 rows merge as nothing
    return pa.table(row)


@dataclass
class TrainingData:
    """What the job trains and evaluates with: lazy Ray Datasets per split over one source."""

    source: Source
    fractions: dict[str, float]
    salt: str
    window: int
    counts: dict[str, int]  # queries per split
    normalizer: FeatureNormalizer
    model_config: RerankerConfig
    read_ray_args: dict[str, Any]
    cache_max_bytes: int = 0
    block_queries: int = 0  # rows per block into the workers (`data.block_queries`; 0 = as read)

    @property
    def source_bytes(self) -> int:
        """The source's size on storage (the manifest's shard sizes)."""
        return sum(int(s["bytes"]) for s in self.source.dataset.manifest["shards"])

    @property
    def spec(self) -> FeatureSpec:
        return self.source.spec

    @property
    def data_fingerprint(self) -> str:
        return self.source.fingerprint

    def read(self) -> Any:
        """The source's rows (the columns training reads), a fresh lazy `ray.data.Dataset`."""
        import ray.data

        ds = self.source.dataset
        return ray.data.read_parquet(
            ds.paths, filesystem=ds.filesystem, columns=training_columns(self.spec), **self.read_ray_args
        )

    def split(self, *names: str) -> Any:
        """The rows of the named splits, lazily filtered by the query hash."""
        return self.read().map_batches(
            _keep_split,
            fn_kwargs={"names": list(names), "fractions": self.fractions, "salt": self.salt},
            batch_format="pyarrow",
            zero_copy_batch=True,
        )

    def datasets(self, train: str = "train", validation: str = "validation") -> dict[str, Any]:
        """``TorchTrainer(datasets=...)``: the training and the validation split, each streamed from
        storage every epoch, or read once into the object store when it is small (`cached`)."""
        out = {}
        for name, split in (("train", train), ("validation", validation)):
            ds = prepared(self.split(split), self.spec, self.normalizer, self.window, self.block_queries)
            out[name] = ds.materialize() if self.cached(split) else ds
        return out

    def split_bytes(self, split: str) -> float:
        """A split's estimated size on storage: its share of the queries times the source's size."""
        return self.source_bytes * self.counts[split] / max(1, sum(self.counts.values()))

    def cached(self, split: str) -> bool:
        """Whether `split` is read once and kept in the object store (`data.cache_max_mb`): a small
        split costs more in per-epoch read start-up (seconds on a small box) than in memory, and a
        streamed one re-reads the whole source to filter it (the split is a hash of the query id)."""
        return self.split_bytes(split) <= self.cache_max_bytes

    def loop_config(self) -> dict[str, Any]:
        """What a Train worker needs to batch its shards (picklable, small)."""
        return {
            "spec": self.spec.model_dump(mode="json"),
            "normalizer": self.normalizer.to_dict(),
            "window": self.window,
            "train_lists": self.counts["train"],
        }


@dataclass
class InMemoryData:
    """Lists already in memory (cross-fitting's folds: small data by design) on the same Ray Data
    path: each split becomes Arrow tables of the Parquet schema in the object store
    (`ray.data.from_arrow`), batched on the workers by the same `ShardBatches` as a Parquet source."""

    prepared: Any  # cotrr_ray.training.prepare.PreparedData
    window: int
    tables_per_split: dict[str, list[pa.Table]]

    @classmethod
    def of(cls, prepared: Any, window: int, *, lists_per_table: int = SCORE_BATCH) -> InMemoryData:
        from cotrr_ray.data.parquet import arrow_schema, lists_to_batch

        schema = arrow_schema(prepared.spec, window)
        tables = {}
        for name in ("train", "validation"):
            ls = prepared.lists[name]
            tables[name] = [
                pa.Table.from_batches([lists_to_batch(ls[i : i + lists_per_table], schema, prepared.spec)])
                for i in range(0, len(ls), lists_per_table)
            ]
        return cls(prepared, window, tables)

    @property
    def model_config(self) -> RerankerConfig:
        return self.prepared.model_config

    @property
    def data_fingerprint(self) -> str | None:
        return self.prepared.data_fingerprint

    def datasets(self) -> dict[str, Any]:
        import ray.data

        p = self.prepared
        return {
            name: prepared(ray.data.from_arrow(tables), p.spec, p.normalizer, self.window, 0)  # tables are small
            for name, tables in self.tables_per_split.items()
        }

    def loop_config(self) -> dict[str, Any]:
        return {
            "spec": self.prepared.spec.model_dump(mode="json"),
            "normalizer": self.prepared.normalizer.to_dict(),
            "window": self.window,
            "train_lists": len(self.prepared.lists["train"]),
        }


def open_training_data(cfg: TrainConfig, source: Source, *, fit_on: tuple[str, ...] = ("train",)) -> TrainingData:
    """Splits, their sizes and the normaliser fitted on the `fit_on` splits, from one pass over the
    source: each block returns its split counts and the exact moments of its training rows, which
    the driver merges (`Moments.merge`; nothing like the rows themselves is collected)."""
    import ray.data

    d = cfg.data
    fractions = {k: v for k, v in d.splits.items() if v > 0}
    window = cfg.model.top_m
    data = TrainingData(
        source,
        fractions,
        d.split_salt,
        window,
        {},
        FeatureNormalizer(source.spec),
        model_config(cfg, source.spec),
        {},
        cache_max_bytes=int(d.cache_max_mb * 2**20),
        block_queries=d.block_queries,
    )
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the merge order, hence the float64 sums, is fixed
    try:
        rows = (
            data.read()
            .map_batches(
                _split_stats,
                fn_kwargs={
                    "fractions": fractions,
                    "salt": d.split_salt,
                    "fit_on": list(fit_on),
                    "spec": source.spec.model_dump(mode="json"),
                    "window": window,
                },
                batch_format="pyarrow",
            )
            .take_all()
        )
    finally:
        ctx.execution_options.preserve_order = saved
    counts = np.sum([r["counts"] for r in rows], axis=0).astype(int).tolist()
    data.counts = dict(zip(fractions, counts))
    if not any(data.counts[s] for s in fit_on):
        raise ValueError(f"split {fit_on[0]!r} is empty: {sum(counts)} queries are too few for {d.splits}")
    data.normalizer.fit_moments(merge_moment_rows(rows))
    return data


# ----------------------------------------------------------------------------- Train workers


def ingest_config() -> Any:
    """``TorchTrainer(dataset_config=...)``: training shards equal and deterministic, validation whole."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    class IngestConfig(DataConfig):
        """`DataConfig` that splits "train" with ``equal=True`` (DDP needs the same number of batches
        on every rank; at most world_size - 1 queries an epoch are left out) and "validation" with
        ``equal=False`` (every query scored once, by some rank), both under `preserve_order`."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                if ds.name is None:
                    ds.set_name(name)
                options = self.default_ingest_options()
                options.preserve_order = True
                ds.context.execution_options = options
                for i, it in enumerate(ds.streaming_split(world_size, equal=name == "train")):
                    output[i][name] = it
            return output

    return IngestConfig(execution_options=ExecutionOptions(preserve_order=True))


class ShardBatches:
    """One rank's shard of a Ray Dataset as padded batches (`training.loop.Batches`).

    `shard` is what ``ray.train.get_dataset_shard`` returns (a `DataIterator`; the Dataset itself in
    Train's local mode) over `prepared` rows (normalised by Ray Data's tasks), so the collate here
    only gathers and pads. Training batches come through a local shuffle buffer seeded by (seed,
    rank, epoch); validation batches in shard order."""

    def __init__(
        self,
        shard: Any,
        normalizer: FeatureNormalizer,
        *,
        window: int,
        batch_size: int,
        num_lists: int,
        shuffle_buffer: int | None,
        seed: int,
        rank: int,
        prefetch_batches: int = 1,
    ) -> None:
        self.shard, self.normalizer, self.window = shard, normalizer, window
        self.batch_size, self.shuffle_buffer, self.seed, self.rank = batch_size, shuffle_buffer, seed, rank
        self.prefetch_batches = prefetch_batches
        self.num_lists = num_lists
        self.num_batches = -(-num_lists // batch_size)

    def epoch_tables(self, epoch: int) -> Iterator[pa.Table]:
        """The epoch's batches as Arrow tables (the rows, ids included), in training order."""
        shuffle = {}
        if self.shuffle_buffer:
            seed = epoch_seed(self.seed, self.rank, epoch) % 2**32
            shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": seed}
        yield from self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", prefetch_batches=self.prefetch_batches, **shuffle
        )

    def collate(self, table: pa.Table) -> PaddedLists:
        return padded_prepared(table, self.normalizer.spec)

    def epoch(self, epoch: int) -> Iterator[PaddedLists]:
        return map(self.collate, self.epoch_tables(epoch))


def shard_batches(
    cfg: TrainConfig, data_config: dict[str, Any], train: Any, validation: Any, rank: int, world_size: int
) -> tuple[ShardBatches, ShardBatches]:
    """One rank's training and validation batches over its shards (`DataIterator`s, or Datasets in
    one process), normalised with the fitted normaliser in `data_config` (`loop_config()`)."""
    spec = FeatureSpec.model_validate(data_config["spec"])
    normalizer = FeatureNormalizer.from_dict(data_config["normalizer"], spec)
    window, o = data_config["window"], cfg.optim
    train_batches = ShardBatches(
        train,
        normalizer,
        window=window,
        batch_size=o.batch_size,
        num_lists=data_config["train_lists"] // max(1, world_size),  # equal=True: the remainder is dropped
        shuffle_buffer=cfg.data.shuffle_buffer_queries,
        seed=o.seed,
        rank=rank,
    )
    val_batches = ShardBatches(
        validation,
        normalizer,
        window=window,
        batch_size=SCORE_BATCH,
        num_lists=0,  # unknown per rank (equal=False) and unused: validation is not stepped
        shuffle_buffer=None,
        seed=o.seed,
        rank=rank,
    )
    return train_batches, val_batches


def worker_batches(
    cfg: TrainConfig, data_config: dict[str, Any], rank: int, world_size: int
) -> tuple[ShardBatches, ShardBatches]:
    """A Train worker's batches, from its dataset shards (``ray.train.get_dataset_shard``)."""
    import ray.train

    train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation")
    return shard_batches(cfg, data_config, train, val, rank, world_size)


def in_process_batches(cfg: TrainConfig, data: TrainingData | InMemoryData) -> tuple[ShardBatches, ShardBatches]:
    """The batches Train's local mode (``num_workers=0``) would give this process for `data`:
    the same Ray Data path, so an in-process fit equals the job's with the same seed."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = data.datasets()
    return shard_batches(cfg, data.loop_config(), ds["train"], ds["validation"], 0, 1)


# ----------------------------------------------------------------------------- scoring a split


def _state_bytes(model: Reranker) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


class SplitScorer:
    """A Ray Data actor: the model once, then per batch its window logits and the labels.

    The featurisation is `padded_batch` (equal to the bundle's `featurize`, tested) and the model
    call `core.scoring.predict_logits` at `inference_amp`, the Scorer's precision."""

    def __init__(self, state: bytes, model_config: dict, spec: dict, normalizer: dict, window: int, threads: int):
        from cotrr_ray.core.scoring import inference_amp

        torch.set_num_threads(max(1, threads))
        self.spec = FeatureSpec.model_validate(spec)
        self.normalizer = FeatureNormalizer.from_dict(normalizer, self.spec)
        self.model = Reranker(RerankerConfig.from_dict(model_config))
        self.model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        self.model.eval()
        self.window = window
        self.amp = inference_amp("cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cotrr_ray.core.scoring import predict_logits

        padded = padded_batch(batch, self.normalizer, window=self.window, labels=False)
        logits = predict_logits(self.model, padded, amp=self.amp, batch_size=SCORE_BATCH)
        windows = padded.mask.sum(axis=1)
        flat = logits[padded.mask].astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(windows)]).astype(np.int32)
        return pa.table(
            {
                "query_id": batch.column("query_id"),
                "logits": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                "label": batch.column("label"),
            }
        )


@dataclass
class ScoredQuery:
    """What evaluation needs of one query (duck-types `CandidateList` for `evaluate_lists`)."""

    query_id: str
    labels: np.ndarray  # (n,) every candidate, upstream order
    window: int

    def __len__(self) -> int:
        return len(self.labels)


def score_split(
    data: TrainingData, names: Iterable[str], model: Reranker, *, actors: int = 1, cpus_per_actor: float = 1
) -> tuple[list[ScoredQuery], list[np.ndarray]]:
    """The window logits of every query of the `names` splits, in source order, by Ray Data batch
    inference (an actor pool of `actors` models); the driver receives logits and labels only."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        scored = data.split(*names).map_batches(
            SplitScorer,
            fn_constructor_kwargs={
                "state": _state_bytes(model),
                "model_config": data.model_config.to_dict(),
                "spec": data.spec.model_dump(mode="json"),
                "normalizer": data.normalizer.to_dict(),
                "window": data.window,
                "threads": max(1, int(cpus_per_actor)),
            },
            batch_size=SCORE_BATCH,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
        )
        queries, logits = [], []
        for table in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            batch = as_record_batch(table)
            qids = batch.column("query_id").to_pylist()
            z = batch.column("logits")
            z_values, z_off = z.flatten().to_numpy(), z.offsets.to_numpy()
            lab = batch.column("label")
            l_values, l_off = lab.flatten().to_numpy(), lab.offsets.to_numpy()
            for i, q in enumerate(qids):
                w = z_values[z_off[i] - z_off[0] : z_off[i + 1] - z_off[0]]
                labels = l_values[l_off[i] - l_off[0] : l_off[i + 1] - l_off[0]]
                queries.append(ScoredQuery(q, labels.astype(np.float32), len(w)))
                logits.append(w.copy())
    finally:
        ctx.execution_options.preserve_order = saved
    return queries, logits
