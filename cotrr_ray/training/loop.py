"""The training loop: plain PyTorch, no Ray import.

`fit()` is one loop for every launcher. What differs between launchers (rank, device, DDP wrapping,
data sharding, checkpoint storage, metric reporting) sits behind a small `LoopContext`:
`cotrr_ray.training.job.RayContext` for Ray Train workers, `cotrr_ray.training.torchrun.TorchContext` for a
single process or `torchrun` (so the same step can be checked on a GPU machine without Ray):

    torchrun --nproc-per-node 2 -m cotrr_ray.training.torchrun --config configs/demo.yaml scaling.use_gpu=true
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import PaddedLists
from cotrr_ray.core.losses import ranking_loss
from cotrr_ray.core.metrics import ndcg_at_k
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.scoring import autocast, inference_amp, predict_logits, to_tensors
from cotrr_ray.training.checkpoints import check_resumable, run_fingerprint

logger = logging.getLogger(__name__)


# nDCG@10 of the validation queries over their Top-M windows only (what the model reorders), not over
# the full list as the test report's ndcg@10 (cotrr_ray.training.evaluate); early stopping and
# checkpoint selection use it.
VAL_METRIC = "val_window_ndcg@10"
BEST_VAL_METRIC = "best_val_window_ndcg@10"


class LoopContext(Protocol):
    """What `fit` needs from its launcher."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...
    def load_checkpoint(self) -> dict[str, Any] | None: ...
    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        """Called by every rank once per epoch; `state` (rank 0 only) is the checkpoint to keep."""


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only; biases, norms and embeddings-as-vectors are left alone (AdamW practice).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def window_ndcg(logits: np.ndarray, lists: PaddedLists, k: int = 10) -> float:
    """Mean nDCG@k over the Top-M windows of queries with a relevant candidate (validation metric)."""
    values = []
    assert lists.labels is not None
    for i in range(len(lists)):
        n = int(lists.mask[i].sum())
        v = ndcg_at_k(logits[i, :n], lists.labels[i, :n], k)
        if v is not None:
            values.append(v)
    return float(np.mean(values)) if values else float("nan")


def _collate(padded: PaddedLists) -> Callable[[list[int]], tuple[dict[str, Any], torch.Tensor]]:
    def collate(idx: list[int]) -> tuple[dict[str, Any], torch.Tensor]:
        batch = padded.take(np.asarray(idx))
        return to_tensors(batch, "cpu"), torch.from_numpy(batch.labels)

    return collate


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of one rank's epoch (dropout, input noise).

    A pure function of (seed, rank, epoch), so a resumed run replays what an undisturbed one would
    have drawn. The rank is in it so that DDP ranks draw different dropout masks and noise: with
    one seed for all, every rank would apply the same masks to its shard. SeedSequence mixes the
    three (no collisions between nearby tuples); it takes non-negative entropy, hence the modulo.
    """
    return int(np.random.SeedSequence([seed % 2**64, rank, epoch]).generate_state(1, np.uint64)[0])


def _add_noise(inputs: dict[str, Any], std: float) -> None:
    for scope in ("candidate", "query"):
        for g, t in inputs[scope].items():
            inputs[scope][g] = t + std * torch.randn_like(t)


@dataclass
class _Training:
    """What one `fit` call trains with: the (wrapped) model, its optimiser state and the loader."""

    model: torch.nn.Module  # as called: DDP-wrapped and/or compiled
    raw_model: Reranker  # parameters and checkpoints
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: DataLoader


@dataclass
class _Progress:
    """Where early stopping stands; part of every checkpoint."""

    start_epoch: int = 0
    best: float = -math.inf
    bad_epochs: int = 0
    resumed: bool = False


def _setup(cfg: TrainConfig, model_config: RerankerConfig, train: PaddedLists, ctx: LoopContext) -> _Training:
    """Model (seeded), AdamW, the launcher's loader, warm-up + cosine schedule and the AMP grad scaler."""
    o = cfg.optim
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(o.seed)
    raw_model = Reranker(model_config).to(ctx.device)
    model = ctx.prepare_model(raw_model)
    if o.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(_param_groups(raw_model, o.weight_decay), lr=o.lr, betas=(0.9, 0.98))
    loader = ctx.prepare_loader(
        DataLoader(list(range(len(train))), batch_size=o.batch_size, shuffle=True, collate_fn=_collate(train))
    )
    steps_per_epoch = math.ceil(len(loader) / o.grad_accum_steps)
    total = steps_per_epoch * o.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(o.warmup_frac * total), o.min_lr_ratio))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=o.amp == "fp16")
    return _Training(model, raw_model, opt, sched, scaler, loader)


def _resume(t: _Training, ctx: LoopContext, fingerprint: dict[str, Any]) -> _Progress:
    """Restore the launcher's latest checkpoint, if any, into `t`; where to go on from. A checkpoint
    of another config or other data is refused (`check_resumable`), never continued."""
    state = ctx.load_checkpoint()
    if state is None:
        return _Progress()
    check_resumable(state, fingerprint)
    t.raw_model.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    logger.info("resumed from epoch %d (best %s %.4f)", state["epoch"], VAL_METRIC, state["best"])
    return _Progress(state["epoch"] + 1, state["best"], state["bad_epochs"], resumed=True)


def _train_epoch(cfg: TrainConfig, t: _Training, epoch: int, ctx: LoopContext) -> tuple[list[float], float]:
    """One pass over the loader with gradient accumulation; the per-batch losses and the seconds it took."""
    o = cfg.optim
    # Under DDP the DistributedSampler shuffles from its own seed and the epoch (set_epoch), the
    # same on every rank, so the ranks keep disjoint shards; this seed only drives dropout, noise
    # and the single-process loader's shuffle.
    torch.manual_seed(epoch_seed(o.seed, ctx.rank, epoch))
    loader, model = t.loader, t.model
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    model.train()
    t0, losses = time.perf_counter(), []
    for i, (inputs, labels) in enumerate(loader):
        inputs = {  # no-op on CPU; prepare_data_loader already moved Ray's batches
            "candidate": {g: x.to(ctx.device) for g, x in inputs["candidate"].items()},
            "query": {g: x.to(ctx.device) for g, x in inputs["query"].items()},
            "context": inputs["context"].to(ctx.device),
            "mask": inputs["mask"].to(ctx.device),
        }
        labels = labels.to(ctx.device)
        if o.input_noise_std:
            _add_noise(inputs, o.input_noise_std)
        step_now = (i + 1) % o.grad_accum_steps == 0 or i + 1 == len(loader)
        # Skip the DDP all-reduce on micro-batches that only accumulate.
        sync = contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(ctx.device, o.amp):
                logits = model(**inputs)
            loss = ranking_loss(o.loss, logits.float(), labels, inputs["mask"], ranknet_weight=o.ranknet_weight)
            t.scaler.scale(loss / o.grad_accum_steps).backward()
        losses.append(loss.item())
        if step_now:
            _optimizer_step(t, o.grad_clip)
    return losses, time.perf_counter() - t0


def _optimizer_step(t: _Training, grad_clip: float) -> None:
    t.scaler.unscale_(t.opt)
    torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), grad_clip)
    t.scaler.step(t.opt)
    t.scaler.update()
    t.opt.zero_grad(set_to_none=True)
    t.sched.step()


def _validate(cfg: TrainConfig, t: _Training, val: PaddedLists, ctx: LoopContext) -> float:
    """The validation metric (`VAL_METRIC`: nDCG@10 over the Top-M windows) of the current weights."""
    # Every rank scores the whole validation split with identical weights, so all ranks agree
    # on early stopping without extra communication. At the precision serving scores with on this
    # device, not training's optim.amp: the checkpoint is chosen for the scores it will serve.
    amp = inference_amp(ctx.device)
    return window_ndcg(predict_logits(t.raw_model, val, device=ctx.device, amp=amp), val)


def _checkpoint(
    t: _Training, p: _Progress, epoch: int, model_config: RerankerConfig, metrics: dict, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """The resumable state of the end of `epoch` (what `ctx.report` keeps on rank 0)."""
    return {
        "model": t.raw_model.state_dict(),
        "optimizer": t.opt.state_dict(),
        "scheduler": t.sched.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch": epoch,
        "best": p.best,
        "bad_epochs": p.bad_epochs,
        "model_config": model_config.to_dict(),
        "metrics": metrics,
        "fingerprint": fingerprint,
    }


def fit(
    cfg: TrainConfig,
    model_config: RerankerConfig,
    train: PaddedLists,
    val: PaddedLists,
    ctx: LoopContext,
    *,
    data_fingerprint: str | None = None,
) -> None:
    """Train with early stopping on `VAL_METRIC`; every epoch reports a resumable checkpoint.

    The recipe: set up, resume, then per epoch train, validate, report (metrics on every rank, the
    checkpoint from rank 0), and stop early once `optim.patience` epochs in a row did not improve.
    `data_fingerprint` (`file_fingerprint` of the data file) goes into each checkpoint's fingerprint
    with the config's (`run_fingerprint`); resuming from a checkpoint with another one raises.
    """
    o = cfg.optim
    fingerprint = run_fingerprint(cfg, model_config, data_fingerprint)
    t = _setup(cfg, model_config, train, ctx)
    p = _resume(t, ctx, fingerprint)
    stopping = o.select == "best_val"
    if stopping and p.bad_epochs >= o.patience:
        return  # the checkpoint we resumed from had already triggered early stopping
    for epoch in range(p.start_epoch, o.max_epochs):
        losses, epoch_s = _train_epoch(cfg, t, epoch, ctx)
        val_metric = _validate(cfg, t, val, ctx)
        if val_metric > p.best + 1e-6:
            p.best, p.bad_epochs = val_metric, 0
        else:
            p.bad_epochs += 1
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            VAL_METRIC: val_metric,
            BEST_VAL_METRIC: p.best,
            "lr": t.sched.get_last_lr()[0],
            "epoch_s": epoch_s,
            "train_samples_per_s_per_worker": len(train) / ctx.world_size / epoch_s,
        }
        ctx.report(metrics, _checkpoint(t, p, epoch, model_config, metrics, fingerprint) if ctx.rank == 0 else None)
        if cfg.scaling.fail_after_epoch == epoch and not p.resumed and ctx.rank == 0:
            raise RuntimeError(f"injected failure after epoch {epoch} (scaling.fail_after_epoch)")
        if stopping and p.bad_epochs >= o.patience:
            break
