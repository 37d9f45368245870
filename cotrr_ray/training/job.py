"""The training job: data -> Ray Train (DDP) -> best checkpoint -> calibration -> evaluation -> bundle.

Phases, in order (`run`):
1. prepare: load (or generate) the data, split by query, fit the input normaliser on train;
2. fit: `ray.train.torch.TorchTrainer` runs `cotrr_ray.training.loop.fit` on every worker (gloo on CPU,
   NCCL on GPU), checkpointing each epoch, restarting failed worker groups from the latest one;
3. calibrate: score the calibration split with the best checkpoint, fit the isotonic calibrator
   (or cross-fit it on out-of-fold scores of the training queries, `calibration.method: cross_fit`);
4. evaluate: test split only (never data the model or the calibrator was fitted on);
   `evaluation.method: cross_fit` (small data) replaces 2-4 by `crossfit.fit_cross_fitted`: the
   final model on every query, K fold models over the same queries, whose out-of-fold scores give
   the calibrator and the report;
5. publish: write the bundle into the registry (`cfg.output` = `<registry>/<name>`, local or s3://)
   under a new immutable id, and move `cfg.alias` to it (compare-and-swap) when one is given.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cotrr_ray.bundles.bundle import Bundle
from cotrr_ray.bundles.registry import AliasMove, BundleSource, Registry
from cotrr_ray.config import TrainConfig
from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CandidateList, FeatureNormalizer, labels01
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.storage import locate
from cotrr_ray.training.checkpoints import kept_epochs, load_state, model_from_state, run_fingerprint, save_state
from cotrr_ray.training.evaluate import evaluate_lists, format_report
from cotrr_ray.training.ingest import InMemoryData, ScoredQuery, Source, TrainingData, parquet_source, score_split
from cotrr_ray.training.loop import VAL_METRIC, all_reduce_sum, fit
from cotrr_ray.training.prepare import PreparedData, all_queries_data, prepare_splits

logger = logging.getLogger(__name__)


ReportHook = Callable[["RayContext", dict[str, float], float, float], None]


class RayContext:
    """`LoopContext` for a Ray Train worker.

    `on_report(ctx, metrics, t_before, t_after)`, if given, runs after each per-epoch report with its
    wall-clock bounds (time.time(); the checkpoint write included); `t_start` is when the worker loop
    began. bench/train_bench.py times epochs this way."""

    def __init__(
        self, local_dir: str | None = None, *, on_report: ReportHook | None = None, t_start: float | None = None
    ) -> None:
        import ray.train
        import ray.train.torch

        self.t_start = time.time() if t_start is None else t_start
        self.on_report = on_report
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Train V2 local mode (num_workers=0) keeps no checkpoint of its own: only a reference to the
        # last reported directory, and ours is a temporary one. There every epoch is kept here instead.
        self.local_dir = Path(local_dir) if local_dir else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return all_reduce_sum(values, self.world_size, self.device)

    def load_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        if self.local_dir is not None:  # local mode: resume a rerun of the same run_name from local_dir
            done = sorted(self.local_dir.glob("epoch_*/state.pt"))
            return load_state(done[-1].parent) if done else None
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        t_before = time.time()
        self._report(metrics, state)
        if self.on_report is not None:
            self.on_report(self, metrics, t_before, time.time())

    def _report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        if self.local_dir is not None:
            checkpoint = None
            if state is not None:
                d = self.local_dir / f"epoch_{int(metrics['epoch']):03d}"
                d.mkdir(parents=True, exist_ok=True)
                save_state(state, d)
                checkpoint = ray.train.Checkpoint.from_directory(str(d))
            ray.train.report(metrics, checkpoint=checkpoint)
            return
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if state is not None:
                save_state(state, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker loop: `fit` with a `RayContext` over this worker's dataset shards.
    Config keys: cfg, model_config, data (`TrainingData.loop_config`), local_dir (local mode),
    data_fingerprint, and optionally on_report (a picklable `ReportHook`, shipped with the config)."""
    t_start = time.time()
    from cotrr_ray.training.ingest import worker_batches  # imports ray.train: only on a worker

    cfg = TrainConfig.model_validate(config["cfg"])
    model_config = RerankerConfig.from_dict(config["model_config"])
    ctx = RayContext(config.get("local_dir"), on_report=config.get("on_report"), t_start=t_start)
    train, val = worker_batches(cfg, config["data"], ctx.rank, ctx.world_size)
    fit(cfg, model_config, train, val, ctx, data_fingerprint=config.get("data_fingerprint"))


def make_trainer(
    cfg: TrainConfig,
    train_loop: Callable[[dict[str, Any]], None],
    train_loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    max_failures: int,
    datasets: dict[str, Any] | None = None,
) -> Any:
    """The job's `TorchTrainer`: scaling, DDP backend, checkpoint policy and worker env from `cfg`.
    bench/train_bench.py times this same trainer and worker loop (with an `on_report` hook)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cotrr_ray.training.ingest import ingest_config

    s = cfg.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config=train_loop_config,
        datasets=datasets,
        dataset_config=ingest_config(),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max"
            ),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(s.torch_threads)}},
        ),
    )


def run_ray_train(cfg: TrainConfig, data: TrainingData | InMemoryData, storage_path: str | Path) -> dict[str, Any]:
    """Fit through Ray Train, each worker streaming its shard of `data`'s Ray Datasets, and return
    the best checkpoint's state (by `VAL_METRIC`)."""
    from ray.train import Checkpoint

    s = cfg.scaling
    run_name = s.run_name or f"cotrr-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    local_dir = Path(storage_path) / run_name / "local_checkpoints" if s.num_workers == 0 else None
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "model_config": data.model_config.to_dict(),
        "data": data.loop_config(),
        "local_dir": str(local_dir) if local_dir else None,
        "data_fingerprint": data.data_fingerprint,
    }
    trainer = make_trainer(
        cfg,
        _worker_loop,
        loop_config,
        name=run_name,
        storage_path=storage_path,
        max_failures=s.max_failures,
        datasets=data.datasets(),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if local_dir is not None:
        # Local mode returns only the last report; choose among this run's epochs in local_dir.
        kept = kept_epochs(local_dir, run_fingerprint(cfg, data.model_config, data.data_fingerprint))
        candidates = [(Checkpoint.from_directory(str(d)), metrics) for d, metrics in kept]
        last = candidates[-1] if candidates else None
    else:
        candidates = list(result.best_checkpoints or [])
        last = (result.checkpoint, result.metrics) if result.checkpoint is not None else None
    if not candidates or last is None:
        raise RuntimeError("training produced no checkpoint")
    if cfg.optim.select == "last":
        best_ckpt, best_metrics = last
    else:
        # max() keeps the first of equal scores: the earliest epoch, as fit's early stopping does.
        best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1][VAL_METRIC])
    with best_ckpt.as_directory() as d:
        state = load_state(d)
    state["final_metrics"] = dict(result.metrics or {})
    state["run_path"] = str(result.path or Path(storage_path) / run_name)
    logger.info(
        "selected checkpoint (%s): epoch %d, %s %.4f",
        cfg.optim.select,
        best_metrics["epoch"],
        VAL_METRIC,
        best_metrics[VAL_METRIC],
    )
    return state


def resolve_data_path(cfg: TrainConfig, say: Callable[[str], None]) -> str | Path:
    if cfg.data.format == "parquet" and cfg.data.path is not None:
        return cfg.data.path  # a dataset directory or an s3:// URI, never a Path (it would fold the //)
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    if cfg.data.format != "jsonl":
        raise ValueError(f"data.path is required for data.format {cfg.data.format} (only JSONL data can be generated)")
    from cotrr_ray.data.synthetic import generate

    g = cfg.data.generate
    path = Path(cfg.data.cache_dir) / (
        f"synthetic-q{g.queries}-s{g.seed}-c{g.min_candidates}-{g.max_candidates}-m{cfg.model.top_m}.jsonl"
    )
    if path.exists():
        say(f"using cached synthetic data {path}")
    else:
        say(f"generating {g.queries} synthetic queries -> {path}")
        generate(
            path.with_suffix(".tmp"),
            queries=g.queries,
            seed=g.seed,
            min_candidates=g.min_candidates,
            max_candidates=g.max_candidates,
            top_m=cfg.model.top_m,
        ).rename(path)
    return path


@dataclass(frozen=True)
class Published:
    """What a training run published: the bundle's id, its URI in the registry, the alias it moved."""

    bundle_id: str
    uri: str
    alias: AliasMove | None = None

    def local_dir(self) -> Path:
        """The bundle as a local directory (in place for a local registry, else the verified cache copy)."""
        return BundleSource.parse(self.uri).resolve()[1]

    def __str__(self) -> str:  # train_job.py's last line
        moved = f" ({self.alias.alias} -> it)" if self.alias else ""
        return f"bundle {self.bundle_id} {self.uri}{moved}"


def run(cfg: TrainConfig, say: Callable[[str], None] = print) -> Published:
    """Run every phase; the bundle is published into the registry `cfg.output` names."""
    import ray
    import ray.data

    t_start = time.perf_counter()
    data_path = resolve_data_path(cfg, say)
    if not ray.is_initialized():
        ray.init()  # attaches to a running cluster (RAY_ADDRESS / ray start), else starts a local one
    _check_cpus(cfg)
    storage = _storage_path(cfg)
    source = parquet_source(cfg, data_path, say)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    # Deterministic reads everywhere (local mode's shards too): the same run replays the same batches.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # one per epoch and split would bury the job's own lines
    try:
        if cfg.evaluation.method == "cross_fit":
            data = all_queries_data(cfg, source.spec, _records(cfg, source), source.fingerprint)
            sizes = {"train": len(data.lists["train"])}  # "validation" is the same queries (monitoring only)
            say(
                f"cross-fitted evaluation: all {sizes['train']} queries train the final model, {cfg.calibration.folds} fold models score them"
            )
            say(f"model {data.model_config.d_model}d x {data.model_config.n_layers} layers")
            state, model, calibrator, calibration_fit, fit_s, report_lists, report_logits, report, probs = (
                _cross_fitted(cfg, data, storage, say)
            )
            report_key, report_name, normalizer, spec = "cross_fit", "cv", data.normalizer, data.spec
        else:
            tdata = open_training_data_checked(cfg, source)
            sizes = dict(tdata.counts)
            say(f"splits by query: {sizes}")
            how = {
                split: "read once into the object store" if tdata.cached(split) else "streamed every epoch"
                for split in ("train", "validation")
            }
            say(
                f"dataset {tdata.source_bytes / 2**20:.0f} MB on storage: train {how['train']}, "
                f"validation {how['validation']} (data.cache_max_mb)"
            )
            say(f"model {tdata.model_config.d_model}d x {tdata.model_config.n_layers} layers")
            state, model, fit_s = _fit_best(cfg, tdata, storage, say)
            calibrator, calibration_fit = _calibrate(cfg, tdata, source, model, storage, say)
            report_lists, report_logits, report = _evaluate_test(cfg, tdata, model, calibrator, say)
            probs, report_key, report_name, normalizer, spec = None, "test", "test", tdata.normalizer, tdata.spec
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    metrics = {
        "evaluation": cfg.evaluation.method,
        report_key: report,
        "best_checkpoint": state["metrics"],
        "final_epoch": state.get("final_metrics", {}),
        "splits": sizes,
        "calibration_fit": calibration_fit,
        "timing_s": {"fit": fit_s, "total": time.perf_counter() - t_start},
        "headline": {
            f"{report_name}_ndcg@10_model": report["ndcg@10"]["model"],
            f"{report_name}_ndcg@10_upstream": report["ndcg@10"]["upstream"],
            f"{report_name}_ece_calibrated": report["calibration"]["calibrated"]["ece_equal_width"],
        },
    }
    with tempfile.TemporaryDirectory() as staging:
        bundle_dir = _export(
            cfg,
            spec,
            normalizer,
            source.fingerprint,
            model,
            calibrator,
            metrics,
            report_key,
            report_lists,
            report_logits,
            probs,
            staging,
        )
        return _publish(cfg, bundle_dir, say)


def open_training_data_checked(cfg: TrainConfig, source: Source) -> TrainingData:
    """`ingest.open_training_data`, refusing empty training or validation splits."""
    from cotrr_ray.training.ingest import open_training_data

    data = open_training_data(cfg, source)
    for name in ("train", "validation"):
        if not data.counts.get(name):
            total = sum(data.counts.values())
            raise ValueError(f"split {name!r} is empty: {total} queries are too few for {cfg.data.splits}")
    return data


def _records(cfg: TrainConfig, source: Source) -> list[CandidateList]:
    """Every list of the source in memory: only for cross-fitting, a small-data method by design."""
    from cotrr_ray.data.parquet import read_parquet_records

    return read_parquet_records(source.dataset.location.uri, source.spec, window=cfg.model.top_m)


def _check_cpus(cfg: TrainConfig) -> None:
    """Ray Data reads and transforms beside the Train workers; with every CPU reserved by them its
    tasks never run and the job hangs, so refuse at once (as the batch job does)."""
    import ray

    s = cfg.scaling
    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = s.num_workers * s.cpus_per_worker
    if s.num_workers > 0 and reserved > cpus - 1:
        raise ValueError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPUs leave less than 1 of the cluster's "
            f"{cpus:g} CPUs for Ray Data's reads; lower scaling.cpus_per_worker (e.g. 0.5) or num_workers, or "
            "add CPUs"
        )


def _ray_train(storage: str) -> Callable[[TrainConfig, PreparedData], dict[str, Any]]:
    """Cross-fitting's `TrainFn`: in-memory fold data through the same Ray Data path."""
    return lambda c, d: run_ray_train(c, InMemoryData.of(d, c.model.top_m), storage)


def _cross_fitted(cfg: TrainConfig, data: PreparedData, storage: str, say: Callable[[str], None]) -> tuple:
    """Phases fit + calibrate + evaluate of cross-fitted evaluation: `crossfit.fit_cross_fitted` with
    Ray Train as the trainer (the bench runs the same function in-process)."""
    from cotrr_ray.training.crossfit import fit_cross_fitted, oof_probabilities

    cf = fit_cross_fitted(cfg, data, _ray_train(storage))
    say(
        f"final model: epoch {cf.state['epoch']} of {cfg.optim.max_epochs} on all {len(data.lists['train'])} queries "
        f"(fit {cf.fit_s:.0f} s); {cf.result.info()['folds']} cross-fit fold models ({cf.cross_fit_s:.0f} s), "
        f"calibrator on {cf.calibrator.n_samples_} out-of-fold rows"
    )
    report = cf.report(cfg)
    say(format_report(report, title="cross-fitted (out-of-fold) estimate, every query"))
    res = cf.result
    return (
        cf.state,
        cf.model,
        cf.calibrator,
        res.info(),
        cf.fit_s + cf.cross_fit_s,
        res.lists,
        res.calibrated_logits,
        report,
        oof_probabilities(res, cfg),
    )


def registry_model(cfg: TrainConfig) -> tuple[Registry, str]:
    """The registry and model name of `cfg.output` (``<registry>/<name>``)."""
    source = BundleSource.parse(cfg.output)
    if source.alias:
        raise ValueError(f"output {cfg.output!r} names an alias; give the model, <registry>/<name>")
    return source.registry()


def _storage_path(cfg: TrainConfig) -> str:
    """Ray Train's storage as a URI (s3://, gs://) or an absolute local path (a job's cwd is temporary).

    Default: ``<registry>/_runs``, beside the bundles, on the same storage (local or object store)."""
    sp = cfg.scaling.storage_path
    loc = locate(sp) if sp else registry_model(cfg)[0].root.child("_runs")
    if cfg.scaling.num_workers == 0 and not loc.local:
        raise ValueError(
            f"scaling.num_workers 0 (local mode) keeps its checkpoints on local disk; storage_path {loc.uri} "
            "is not local: set scaling.storage_path to a local directory"
        )
    return loc.uri


def _fit_best(
    cfg: TrainConfig, data: TrainingData, storage: str, say: Callable[[str], None]
) -> tuple[dict[str, Any], Reranker, float]:
    """Phase fit: Ray Train; the selected checkpoint's state, its model (eval mode) and the fit seconds."""
    t_fit = time.perf_counter()
    state = run_ray_train(cfg, data, storage)
    fit_s = time.perf_counter() - t_fit
    model = model_from_state(state, data.model_config)
    say(f"best epoch {state['epoch']}: {VAL_METRIC} {state['metrics'][VAL_METRIC]:.4f} (fit {fit_s:.0f} s)")
    return state, model, fit_s


def _score(cfg: TrainConfig, data: TrainingData, split: str, model: Reranker) -> tuple[list[ScoredQuery], list]:
    """A split's window logits by Ray Data batch inference (`ingest.score_split`)."""
    s = cfg.scaling
    return score_split(data, [split], model, actors=s.score_actors, cpus_per_actor=s.cpus_per_worker)


def _calibrate(
    cfg: TrainConfig, data: TrainingData, source: Source, model: Reranker, storage: str, say: Callable[[str], None]
) -> tuple[IsotonicCalibrator, dict[str, Any]]:
    """Phase calibrate: the isotonic calibrator (cross-fitted, or on the calibration split) and how it was fit."""
    t_cal = time.perf_counter()
    if cfg.calibration.method == "cross_fit":
        from cotrr_ray.data.splits import split_by_query
        from cotrr_ray.training.crossfit import cross_fit_calibrator

        # Cross-fitting is for data that fits in memory: its folds are lists here. K fold models, each
        # trained exactly like the final model (same config, same validation split, same checkpoint
        # rule) on K-1 folds of the training (+ calibration) queries.
        splits = split_by_query(_records(cfg, source), data.fractions, data.salt)
        prepared = dataclasses.replace(
            prepare_splits(cfg, data.spec, splits), normalizer=data.normalizer, data_fingerprint=data.data_fingerprint
        )
        calibrator, calibration_fit = cross_fit_calibrator(cfg, prepared, _ray_train(storage), final_model=model)
        say(
            f"cross-fitted calibrator: {calibration_fit['folds']} folds, {calibration_fit['rows']} out-of-fold rows "
            f"({time.perf_counter() - t_cal:.0f} s)"
        )
        return calibrator, calibration_fit
    if not data.counts.get("calibration"):
        raise ValueError("calibration split is empty; give data.splits a 'calibration' fraction")
    queries, logits = _score(cfg, data, "calibration", model)
    calibrator = IsotonicCalibrator(min_samples=cfg.calibration.min_samples).fit(
        np.concatenate(logits), labels01(queries, cfg.data.relevance_threshold)
    )
    say(
        f"calibrator on {calibrator.n_samples_} window candidates of the calibration split ({time.perf_counter() - t_cal:.0f} s)"
    )
    return calibrator, {"method": "holdout", "rows": int(calibrator.n_samples_)}


def _evaluate_test(
    cfg: TrainConfig,
    data: TrainingData,
    model: Reranker,
    calibrator: IsotonicCalibrator,
    say: Callable[[str], None],
) -> tuple[list[ScoredQuery], list[np.ndarray], dict[str, Any]]:
    """Phase evaluate: the test split only; its queries, window logits and report (printed)."""
    if not data.counts.get("test"):
        raise ValueError("test split is empty")
    test_queries, test_logits = _score(cfg, data, "test", model)
    report = evaluate_lists(
        test_queries,
        test_logits,
        calibrator,
        relevance_threshold=cfg.data.relevance_threshold,
        n_boot=cfg.bootstrap_samples,
    )
    say(format_report(report))
    return test_queries, test_logits, report


def _export(
    cfg: TrainConfig,
    spec: FeatureSpec,
    normalizer: FeatureNormalizer,
    data_fingerprint: str,
    model: Reranker,
    calibrator: IsotonicCalibrator,
    metrics: dict[str, Any],
    report_key: str,
    test_lists: list,
    test_logits: list[np.ndarray],
    probabilities: list[np.ndarray] | None,
    staging: str,
) -> Path:
    """Phase export: the bundle, with the report's reliability diagram, in a local staging directory."""
    from cotrr_ray.core.metrics import sigmoid
    from cotrr_ray.training.plots import reliability_diagram

    thr = cfg.data.relevance_threshold
    with tempfile.TemporaryDirectory() as tmp:
        y = labels01(test_lists, thr)
        z = np.concatenate(test_logits)
        p = calibrator.predict(z) if probabilities is None else np.concatenate(probabilities)
        what = "test split" if report_key == "test" else "out-of-fold scores, every query"
        png = reliability_diagram(
            {"raw sigmoid": (sigmoid(z), y), "calibrated": (p, y)},
            Path(tmp) / "reliability.png",
            title=f"{what}, P(label >= {thr:g})",
            metrics=metrics[report_key]["calibration"],
        )
        out = Bundle.save(
            Path(staging) / "bundle",
            model=model,
            spec=spec,
            normalizer=normalizer,
            calibrator=calibrator,
            relevance_threshold=thr,
            metrics=metrics,
            train_config=cfg.model_dump(mode="json"),
            data_fingerprint=data_fingerprint,
            extra_files={"reliability.png": png},
        )
    return out


def _publish(cfg: TrainConfig, bundle_dir: Path, say: Callable[[str], None]) -> Published:
    """Phase publish: the bundle into the registry under its new id, then `cfg.alias` moved to it."""
    registry, name = registry_model(cfg)
    uri = registry.publish(bundle_dir, name)
    bundle_id = uri.rsplit("/", 1)[-1]
    say(f"published {uri}")
    move = None
    if cfg.alias:
        move = registry.set_alias(name, cfg.alias, bundle_id, reason="train_job")
        say(f"alias {cfg.alias}: {move.previous} -> {bundle_id} (move {move.seq})")
    return Published(bundle_id, uri, move)
