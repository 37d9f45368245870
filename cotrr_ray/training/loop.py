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
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.features import PaddedLists
from cotrr_ray.core.losses import ranking_loss
from cotrr_ray.core.metrics import ndcg_at_k
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.scoring import autocast, predict_logits, to_tensors

logger = logging.getLogger(__name__)


VAL_METRIC = "val_ndcg@10"


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


def _add_noise(inputs: dict[str, Any], std: float) -> None:
    for scope in ("candidate", "query"):
        for g, t in inputs[scope].items():
            inputs[scope][g] = t + std * torch.randn_like(t)


def fit(cfg: TrainConfig, model_config: RerankerConfig, train: PaddedLists, val: PaddedLists, ctx: LoopContext) -> None:
    """Train with early stopping on validation nDCG@10; every epoch reports a resumable checkpoint."""
    o = cfg.optim
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(o.seed)
    model = Reranker(model_config).to(ctx.device)
    raw_model = model
    model = ctx.prepare_model(model)
    if o.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(_param_groups(raw_model, o.weight_decay), lr=o.lr, betas=(0.9, 0.98))
    loader = ctx.prepare_loader(
        DataLoader(list(range(len(train))), batch_size=o.batch_size, shuffle=True, collate_fn=_collate(train))
    )
    steps_per_epoch = math.ceil(len(loader) / o.grad_accum_steps)
    total = steps_per_epoch * o.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(o.warmup_frac * total), o.min_lr_ratio))
    fp16 = o.amp == "fp16"
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=fp16)

    start_epoch, best, bad_epochs, resumed = 0, -math.inf, 0, False
    state = ctx.load_checkpoint()
    if state is not None:
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        resumed = True
        logger.info("resumed from epoch %d (best %s %.4f)", state["epoch"], VAL_METRIC, best)

    if o.select == "best_val" and bad_epochs >= o.patience:
        return  # the checkpoint we resumed from had already triggered early stopping
    for epoch in range(start_epoch, o.max_epochs):
        # Seeding per epoch makes shuffling and dropout a function of (seed, epoch), so a run
        # resumed from a checkpoint replays exactly what an undisturbed run would have done.
        torch.manual_seed(o.seed * 100_003 + epoch)
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        t0, losses = time.perf_counter(), []
        for i, (inputs, labels) in enumerate(loader):
            inputs = {  # no-op on CPU; prepare_data_loader already moved Ray's batches
                "candidate": {g: t.to(ctx.device) for g, t in inputs["candidate"].items()},
                "query": {g: t.to(ctx.device) for g, t in inputs["query"].items()},
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
                scaler.scale(loss / o.grad_accum_steps).backward()
            losses.append(loss.item())
            if step_now:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), o.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
        epoch_s = time.perf_counter() - t0
        # Every rank scores the whole validation split with identical weights, so all ranks agree
        # on early stopping without extra communication.
        val_ndcg = window_ndcg(predict_logits(raw_model, val, device=ctx.device, amp="none" if fp16 else o.amp), val)
        if val_ndcg > best + 1e-6:
            best, bad_epochs = val_ndcg, 0
        else:
            bad_epochs += 1
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            VAL_METRIC: val_ndcg,
            "best_val_ndcg@10": best,
            "lr": sched.get_last_lr()[0],
            "epoch_s": epoch_s,
            "train_samples_per_s": len(train) / ctx.world_size / epoch_s,
        }
        ckpt = None
        if ctx.rank == 0:
            ckpt = {
                "model": raw_model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "bad_epochs": bad_epochs,
                "model_config": model_config.to_dict(),
                "metrics": metrics,
            }
        ctx.report(metrics, ckpt)
        if cfg.scaling.fail_after_epoch == epoch and not resumed and ctx.rank == 0:
            raise RuntimeError(f"injected failure after epoch {epoch} (scaling.fail_after_epoch)")
        if o.select == "best_val" and bad_epochs >= o.patience:
            break
