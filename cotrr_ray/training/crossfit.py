"""Cross-fitted (out-of-fold) isotonic calibration for small datasets, and the helpers it needs.

A calibrator fitted on a held-out calibration split sees only that split's few queries; on a small
dataset (MSLR sample: 43 queries, so a 10% split is ~4 queries and ~400 rows) the isotonic map is
noisy. Cross-fitting uses every training query instead:

1. the training (+ calibration) queries are dealt into K folds by query (`assign_folds`);
2. for each fold a *fold model* is trained on the other K-1 folds with the same `TrainConfig` and
   the same `cotrr_ray.training.loop.fit` loop as the final model (through `train_fn`: Ray Train in
   `job.run`, or the in-process `train_in_process` below), with the normaliser refitted on those
   K-1 folds, exactly as `prepare_data` fits it on the training split;
3. the fold model scores only its held-out fold, so every row gets an out-of-fold (OOF) raw score
   from a model that never saw its query;
4. `IsotonicCalibrator` is fitted on all OOF scores.

The model that is served is still the one trained on all training queries; the calibrator maps its
raw scores, so the fold models' scores must be on the final model's scale. They need not be: a
listwise/pairwise loss is blind to a common shift of a list's logits (the offset drifts freely), and
a fold model takes fewer optimizer steps per epoch on (K-1)/K of the data (the logit scale grows
with steps). So when the final model is given, each fold model's out-of-fold scores are first mapped
onto the final model's scale by matching the mean and standard deviation of the two models' logits
on the fold model's own training rows, which both models were trained on (`moment_alignment`). The
fold models follow the final model's recipe exactly: same config, same epochs / checkpoint rule,
same validation split.

Cross-fitted evaluation (`evaluation.method: cross_fit`, `fit_cross_fitted`) goes one step further
for small data: no query is held out at all. The final model trains on every query; the fold models
are the same cross-fit over every query; their out-of-fold scores are both the calibrator's rows and
the quality report (`cross_fitted_report`): ranking metrics per query from a model that did not see
the query, and calibration of each fold's rows by a calibrator fitted on the other folds' rows only
(`oof_probabilities`), since the shipped calibrator saw every row. `job.run` (Ray Train) and
bench/quality_bench.py (in-process) both train through `fit_cross_fitted`: one recipe.

Nothing here imports Ray: `train_fn` decides where the loop runs.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mmh3
import numpy as np
import torch

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CandidateList, labels01
from cotrr_ray.core.model import Reranker
from cotrr_ray.core.spec import FeatureSpec
from cotrr_ray.training.checkpoints import model_from_state
from cotrr_ray.training.evaluate import evaluate_lists
from cotrr_ray.training.loop import VAL_METRIC, fit
from cotrr_ray.training.prepare import PreparedData, prepare_splits, window_logits

logger = logging.getLogger(__name__)

TrainFn = Callable[[TrainConfig, PreparedData], dict[str, Any]]
"""Trains one model: (config, prepared data) -> state dict with at least ``"model"`` (a state_dict),
as returned by `cotrr_ray.training.job.run_ray_train` or `train_in_process`."""


# --------------------------------------------------------------------------- folds


def assign_folds(query_ids: Sequence[str], k: int, salt: str = "cotrr-crossfit") -> np.ndarray:
    """Fold index (0..k-1) per query id: a function of the ids only, never of file order.

    Queries are ordered by MurmurHash3 of ``salt:query_id`` and dealt round-robin, so fold sizes
    differ by at most one. Repeated ids get the same fold.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    unique = sorted(set(query_ids), key=lambda q: (mmh3.hash(f"{salt}:{q}", 0, signed=False), q))
    if len(unique) < k:
        raise ValueError(f"{len(unique)} queries are too few for {k} folds")
    fold_of = {q: i % k for i, q in enumerate(unique)}
    return np.array([fold_of[q] for q in query_ids], dtype=np.int64)


# --------------------------------------------------------------------------- in-process training


@dataclass
class InProcessContext:
    """`LoopContext` for one process without Ray or checkpoint files: keeps epoch states in memory.

    `fit` hands `report` live references to the model's tensors; the context copies what it keeps.
    `on_epoch(epoch, state)` is called after every epoch (e.g. to score a held-out fold per epoch).
    """

    on_epoch: Callable[[int, dict[str, Any]], None] | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[dict[str, float]] = field(default_factory=list)
    last_state: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def load_checkpoint(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.history.append(dict(metrics))
        if state is None:
            return
        kept = {"model": {k: v.detach().clone() for k, v in state["model"].items()}}
        kept.update({k: copy.deepcopy(v) for k, v in state.items() if k not in ("model", "optimizer", "scheduler")})
        self.last_state = kept
        # The same rule as fit's early stopping: a strictly better VAL_METRIC (by 1e-6).
        if self.best_state is None or metrics[VAL_METRIC] > self.best_state["metrics"][VAL_METRIC] + 1e-6:
            self.best_state = kept
        if self.on_epoch is not None:
            self.on_epoch(int(metrics["epoch"]), kept)


def train_in_process(
    cfg: TrainConfig,
    data: PreparedData,
    *,
    select: str = "best",
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    ray_data: bool = False,
) -> dict[str, Any]:
    """Run `cotrr_ray.training.loop.fit` in this process and return the kept state.

    ``select="best"`` returns the epoch with the best `VAL_METRIC` (what `run_ray_train`
    returns); ``select="last"`` the last epoch trained (fixed epochs, e.g. chosen by cross-validation).
    The state has ``"model"``, ``"epoch"``, ``"metrics"`` and ``"history"`` (every epoch's metrics).
    Batches come from the padded arrays in memory (no Ray), or with `ray_data` through the job's
    own Ray Data path (`ingest.in_process_batches`), which makes the model equal the job's.
    """
    if select not in ("best", "last"):
        raise ValueError(f"select must be 'best' or 'last', got {select!r}")
    threads = torch.get_num_threads()
    ctx = InProcessContext(on_epoch=on_epoch)
    train, val = data.padded["train"], data.padded["validation"]
    if ray_data:
        from cotrr_ray.training.ingest import InMemoryData, in_process_batches

        train, val = in_process_batches(cfg, InMemoryData.of(data, cfg.model.top_m))
    try:
        fit(cfg, data.model_config, train, val, ctx)
    finally:
        torch.set_num_threads(threads)  # fit sets the loop's thread count process-wide
    state = ctx.best_state if select == "best" else ctx.last_state
    assert state is not None, "fit reported no epoch"
    state = dict(state)
    state["history"] = ctx.history
    return state


# --------------------------------------------------------------------------- cross-fitting


def moment_alignment(
    fold_model: Reranker,
    fold_data: PreparedData,
    final_model: Reranker,
    final_data: PreparedData,
    shared: list[CandidateList],
) -> tuple[float, float]:
    """(a, b) such that ``a * z_fold + b`` has the mean and standard deviation of the final model's
    logits on the `shared` lists (the fold model's training lists, which the final model also saw)."""
    zf = np.concatenate(window_logits(fold_model, shared, fold_data)).astype(np.float64)
    zF = np.concatenate(window_logits(final_model, shared, final_data)).astype(np.float64)
    sd = zf.std()
    a = float(zF.std() / sd) if sd > 1e-12 else 1.0
    return a, float(zF.mean() - a * zf.mean())


def fit_oof_calibrator(
    oof_logits: list[np.ndarray], lists: list[CandidateList], cfg: TrainConfig
) -> IsotonicCalibrator:
    return IsotonicCalibrator(min_samples=cfg.calibration.min_samples).fit(
        np.concatenate(oof_logits), labels01(lists, cfg.data.relevance_threshold)
    )


@dataclass
class CrossFitResult:
    lists: list[CandidateList]  # the pooled queries, in pool order
    fold: np.ndarray  # (len(lists),) fold of each list
    oof_logits: list[np.ndarray]  # per list: raw window logits from the fold model that did not see it
    fold_epochs: list[int]  # epoch of each fold model's kept checkpoint
    alignment: list[tuple[float, float]] | None  # per fold (a, b) onto the final model's scale
    calibrator: IsotonicCalibrator  # fitted on `calibrated_logits`

    @property
    def calibrated_logits(self) -> list[np.ndarray]:
        """The scores the calibrator is fitted on: OOF logits, aligned to the final model if given."""
        return aligned_logits(self.oof_logits, self.fold, self.alignment)

    def info(self) -> dict[str, Any]:
        return {
            "method": "cross_fit",
            "folds": int(self.fold.max()) + 1,
            "queries": len(self.lists),
            "rows": int(self.calibrator.n_samples_),
            "fold_epochs": list(self.fold_epochs),
            "alignment": None if self.alignment is None else [[round(a, 4), round(b, 4)] for a, b in self.alignment],
        }


def aligned_logits(
    oof_logits: list[np.ndarray], fold: np.ndarray, alignment: list[tuple[float, float]] | None
) -> list[np.ndarray]:
    if alignment is None:
        return list(oof_logits)
    return [alignment[f][0] * np.asarray(z, np.float64) + alignment[f][1] for z, f in zip(oof_logits, fold)]


def fold_run_base(cfg: TrainConfig) -> str:
    """Stem of the fold runs' names. Ray Train resumes a run from storage by name, so: a fixed
    `scaling.run_name` gives fixed fold names (a rerun of a crashed job resumes its folds too); the
    default gives fresh unique names (`job.run`'s timestamped default could collide between fold
    runs that start within the same second)."""
    return cfg.scaling.run_name or f"crossfit-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _fold_config(cfg: TrainConfig, i: int, base: str | None = None) -> TrainConfig:
    s = cfg.scaling
    update = {"run_name": f"{base or fold_run_base(cfg)}-fold{i}", "fail_after_epoch": None}
    return cfg.model_copy(update={"scaling": s.model_copy(update=update)})


def cross_fit(
    cfg: TrainConfig,
    spec: FeatureSpec,
    pool: list[CandidateList],
    validation: list[CandidateList] | None,
    train_fn: TrainFn,
    *,
    k: int | None = None,
    salt: str = "cotrr-crossfit",
    final_model: Reranker | None = None,
    final_data: PreparedData | None = None,
    data_fingerprint: str | None = None,
) -> CrossFitResult:
    """Out-of-fold raw scores for every list in `pool` and the isotonic calibrator fitted on them.

    Fold model i is trained by ``train_fn`` on the pool minus fold i (normaliser refitted on that
    part), with `validation` as its validation split; it then scores fold i only. `validation`
    must not overlap `pool` (it is the final model's validation split in `job.run`). With
    ``validation=None`` each fold model's own training queries stand in for the loop's validation
    split: only for a `train_fn` that keeps the last epoch (fixed epochs), never one that selects
    on validation. With `final_model` (and the `final_data` it was trained with), each fold's OOF
    logits are mapped onto the final model's scale (`moment_alignment`) before the isotonic fit.
    `data_fingerprint` (of the file `pool` came from) gives each fold's data its own fingerprint, so
    a fold run resumed by name (a fixed `scaling.run_name`) refuses another file's or fold's weights.
    """
    if (final_model is None) != (final_data is None):
        raise ValueError("give both final_model and final_data, or neither")
    k = cfg.calibration.folds if k is None else k
    pool_ids = {cl.query_id for cl in pool}
    if validation is not None:
        if pool_ids & {cl.query_id for cl in validation}:
            raise ValueError("validation queries must not be in the cross-fitting pool")
        if not validation:
            raise ValueError("cross_fit needs a non-empty validation split for the fold models (or None)")
    fold = assign_folds([cl.query_id for cl in pool], k, salt)
    base = fold_run_base(cfg)
    final_ids = set() if final_data is None else {cl.query_id for cl in final_data.lists["train"]}
    oof: list[np.ndarray | None] = [None] * len(pool)
    epochs: list[int] = []
    alignment: list[tuple[float, float]] = []
    for i in range(k):
        held = [j for j in range(len(pool)) if fold[j] == i]
        rest = [pool[j] for j in range(len(pool)) if fold[j] != i]
        fold_data = prepare_splits(cfg, spec, {"train": rest, "validation": rest if validation is None else validation})
        if data_fingerprint is not None:  # a fold run trains on part of the file: its own data fingerprint
            fold_data.data_fingerprint = f"{data_fingerprint}:{salt}:fold{i}of{k}"
        state = train_fn(_fold_config(cfg, i, base), fold_data)
        epochs.append(int(state.get("epoch", -1)))
        model = model_from_state(state, fold_data.model_config)
        for j, z in zip(held, window_logits(model, [pool[j] for j in held], fold_data)):
            oof[j] = z
        if final_model is not None:
            # Rows both models were trained on (calibration queries in the pool are not in the final
            # model's training split).
            shared = [cl for cl in rest if cl.query_id in final_ids] or rest
            alignment.append(moment_alignment(model, fold_data, final_model, final_data, shared))  # type: ignore[arg-type]
        logger.info(
            "cross_fit fold %d/%d: %d train, %d held-out queries, epoch %d", i + 1, k, len(rest), len(held), epochs[-1]
        )
    oof_logits = [z for z in oof if z is not None]
    assert len(oof_logits) == len(pool)
    align = alignment if final_model is not None else None
    calibrator = fit_oof_calibrator(aligned_logits(oof_logits, fold, align), pool, cfg)
    return CrossFitResult(list(pool), fold, oof_logits, epochs, align, calibrator)


def cross_fit_calibrator(
    cfg: TrainConfig, data: PreparedData, train_fn: TrainFn, final_model: Reranker | None = None
) -> tuple[IsotonicCalibrator, dict[str, Any]]:
    """`job.run`'s entry point: cross-fit over the training (+ calibration) queries of `data`.

    Fold models use the same validation split as the final model, so their checkpoint choice
    (best validation epoch, or the last epoch) follows the same rule. `final_model` (the model
    trained on `data`) puts the OOF scores on its scale before the isotonic fit (recommended).
    """
    pool = list(data.lists["train"]) + list(data.lists.get("calibration", []))
    res = cross_fit(
        cfg,
        data.spec,
        pool,
        list(data.lists["validation"]),
        train_fn,
        final_model=final_model,
        final_data=None if final_model is None else data,
        data_fingerprint=data.data_fingerprint,
    )
    return res.calibrator, res.info()


# --------------------------------------------------------------------------- cross-fitted evaluation


def oof_probabilities(res: CrossFitResult, cfg: TrainConfig) -> list[np.ndarray]:
    """Per list, P(relevant) of its (aligned) out-of-fold scores from an isotonic calibrator fitted on
    the other folds' rows only. The shipped calibrator was fitted on every row, so its probabilities
    on those rows would be in-sample; these are not, and their ECE / Brier are an honest estimate."""
    z = res.calibrated_logits
    thr = cfg.data.relevance_threshold
    out: list[np.ndarray | None] = [None] * len(res.lists)
    for i in range(int(res.fold.max()) + 1):
        others = [j for j in range(len(res.lists)) if res.fold[j] != i]
        cal = IsotonicCalibrator(min_samples=1).fit(
            np.concatenate([z[j] for j in others]), labels01([res.lists[j] for j in others], thr)
        )
        for j in np.flatnonzero(res.fold == i):
            out[j] = cal.predict(z[j])
    return [p for p in out if p is not None]


def cross_fitted_report(res: CrossFitResult, cfg: TrainConfig, *, n_boot: int | None = None) -> dict[str, Any]:
    """The quality report of cross-fitted evaluation: `evaluate_lists` over every query on its
    out-of-fold scores (bootstrap intervals over queries), calibration from `oof_probabilities`."""
    report = evaluate_lists(
        res.lists,
        res.calibrated_logits,
        None,
        relevance_threshold=cfg.data.relevance_threshold,
        n_boot=cfg.bootstrap_samples if n_boot is None else n_boot,
        probabilities=oof_probabilities(res, cfg),
    )
    k = int(res.fold.max()) + 1
    report["estimate"] = (
        f"cross-fitted: every query scored by the one of {k} fold models that did not train on it; "
        "calibrated probabilities of each fold from an isotonic calibrator fitted on the other folds"
    )
    return report


@dataclass
class CrossFitted:
    """What `fit_cross_fitted` trained: the final model (every query) and the cross-fit over the same queries."""

    state: dict[str, Any]  # the final model's kept state (as `train_fn` returns it)
    model: Reranker  # the final model, eval mode
    data: PreparedData  # what it was trained with (every query; see `prepare.all_queries_data`)
    result: CrossFitResult  # fold models' out-of-fold scores, aligned onto `model`, and the calibrator
    fit_s: float = 0.0  # seconds of the final fit
    cross_fit_s: float = 0.0  # seconds of the K fold fits

    @property
    def calibrator(self) -> IsotonicCalibrator:
        return self.result.calibrator

    def report(self, cfg: TrainConfig, *, n_boot: int | None = None) -> dict[str, Any]:
        return cross_fitted_report(self.result, cfg, n_boot=n_boot)


def fit_cross_fitted(
    cfg: TrainConfig, data: PreparedData, train_fn: TrainFn, *, salt: str = "cotrr-crossfit"
) -> CrossFitted:
    """The small-data recipe (`evaluation.method: cross_fit`): train the final model on every query
    of `data` (`prepare.all_queries_data`) for exactly `optim.max_epochs` epochs, then K fold models of
    the same config over the same queries (`cross_fit`, no separate validation split), their scores
    aligned onto the final model. `job.run` passes Ray Train as `train_fn`, the bench
    `train_in_process`: the same models either way."""
    import time

    if cfg.optim.select != "last":
        raise ValueError("cross-fitted evaluation keeps the last epoch (optim.select: last)")
    train = list(data.lists["train"])
    t0 = time.perf_counter()
    state = train_fn(cfg, data)
    model = model_from_state(state, data.model_config)
    t1 = time.perf_counter()
    res = cross_fit(
        cfg,
        data.spec,
        train,
        None,
        train_fn,
        salt=salt,
        final_model=model,
        final_data=data,
        data_fingerprint=data.data_fingerprint,
    )
    return CrossFitted(state, model, data, res, fit_s=t1 - t0, cross_fit_s=time.perf_counter() - t1)
