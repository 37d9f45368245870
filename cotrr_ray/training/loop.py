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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

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
VALIDATION_BATCH = 256  # lists per validation model call (predict_logits' default)
BEST_VAL_METRIC = "best_val_window_ndcg@10"


class LoopContext(Protocol):
    """What `fit` needs from its launcher."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks (every rank calls it; the identity for one process)."""
        ...

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


def all_reduce_sum(values: np.ndarray, world_size: int, device: torch.device) -> np.ndarray:
    """Element-wise sum of `values` over the process group (the identity for one process): what
    every `LoopContext.all_reduce_sum` of a torch.distributed launcher does."""
    if world_size == 1:
        return values
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()


def window_ndcg_sums(logits: np.ndarray, lists: PaddedLists, k: int = 10) -> np.ndarray:
    """[sum of nDCG@k, number of queries] over the Top-M windows of queries with a relevant
    candidate: one shard's share of the validation metric (sums add across ranks; means do not)."""
    total, count = 0.0, 0
    assert lists.labels is not None
    for i in range(len(lists)):
        n = int(lists.mask[i].sum())
        v = ndcg_at_k(logits[i, :n], lists.labels[i, :n], k)
        if v is not None:
            total, count = total + v, count + 1
    return np.array([total, count], np.float64)


def window_ndcg(logits: np.ndarray, lists: PaddedLists, k: int = 10) -> float:
    """Mean nDCG@k over the Top-M windows of queries with a relevant candidate (validation metric)."""
    total, count = window_ndcg_sums(logits, lists, k)
    return float(total / count) if count else float("nan")


class Batches(Protocol):
    """One rank's data: the padded batches of an epoch, and how many there are.

    Two kinds: `InMemoryBatches` (arrays in this process: torchrun, in-process cross-fitting) and
    `cotrr_ray.training.ingest.ShardBatches` (this rank's shard of a Ray Dataset, the job's path).
    Under DDP every rank must yield the same number of training batches per epoch."""

    num_batches: int  # per epoch, this rank
    num_lists: int  # per epoch, this rank

    def epoch(self, epoch: int) -> Iterable[PaddedLists]: ...


class InMemoryBatches:
    """Padded lists held in memory, batched by a `DataLoader`: shuffled from torch's RNG (which
    `fit` seeds per epoch), or, with ``world_size > 1``, dealt to ranks by a `DistributedSampler`
    (`set_epoch`: one permutation for all ranks, disjoint shards). Unshuffled (validation), rank r
    takes lists r, r + world_size, ... (no padding: the ranks' metric sums add up to the whole)."""

    def __init__(
        self, padded: PaddedLists, batch_size: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.padded, self.shuffle = padded, shuffle
        index = list(range(len(padded)))
        sampler = None
        if world_size > 1:
            if shuffle:
                sampler = torch.utils.data.DistributedSampler(index, world_size, rank, shuffle=True)
            else:
                index = index[rank::world_size]
        self.loader = DataLoader(
            index,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=lambda idx: padded.take(np.asarray(idx)),
        )
        self.num_batches = len(self.loader)
        self.num_lists = len(sampler) if sampler is not None else len(index)

    def epoch(self, epoch: int) -> Iterable[PaddedLists]:
        if isinstance(self.loader.sampler, torch.utils.data.DistributedSampler):
            self.loader.sampler.set_epoch(epoch)
        return self.loader


T = TypeVar("T")


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """(item, is it the last one): a stream's end is known without its length."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


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
    """What one `fit` call trains with: the (wrapped) model, its optimiser state and the batches."""

    model: torch.nn.Module  # as called: DDP-wrapped and/or compiled
    raw_model: Reranker  # parameters and checkpoints
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    batches: Batches


@dataclass
class _Progress:
    """Where early stopping stands; part of every checkpoint."""

    start_epoch: int = 0
    best: float = -math.inf
    bad_epochs: int = 0
    resumed: bool = False


def _setup(cfg: TrainConfig, model_config: RerankerConfig, train: Batches, ctx: LoopContext) -> _Training:
    """Model (seeded), AdamW, warm-up + cosine schedule over `train`'s batches and the AMP grad scaler."""
    o = cfg.optim
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(o.seed)
    raw_model = Reranker(model_config).to(ctx.device)
    model = ctx.prepare_model(raw_model)
    if o.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(_param_groups(raw_model, o.weight_decay), lr=o.lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(train.num_batches / o.grad_accum_steps)
    total = steps_per_epoch * o.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(o.warmup_frac * total), o.min_lr_ratio))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=o.amp == "fp16")
    return _Training(model, raw_model, opt, sched, scaler, train)


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
    """One pass over this rank's batches with gradient accumulation; the per-batch losses and the
    seconds it took."""
    o = cfg.optim
    # The shuffle is the batches' own (a DistributedSampler's or Ray Data's seeded local shuffle,
    # from (seed, epoch)); this seed drives dropout, noise and the single-process loader's shuffle.
    torch.manual_seed(epoch_seed(o.seed, ctx.rank, epoch))
    model = t.model
    model.train()
    t0, losses = time.perf_counter(), []
    for i, (batch, last) in enumerate(_with_last(t.batches.epoch(epoch))):
        inputs = to_tensors(batch, ctx.device)
        labels = torch.from_numpy(batch.labels).to(ctx.device)
        if o.input_noise_std:
            _add_noise(inputs, o.input_noise_std)
        step_now = (i + 1) % o.grad_accum_steps == 0 or last
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


def _validate(t: _Training, val: Batches, ctx: LoopContext) -> float:
    """The validation metric (`VAL_METRIC`: nDCG@10 over the Top-M windows) of the current weights.

    Each rank scores its own shard; the sums are all-reduced, so every rank gets the metric of the
    whole split (the same number as one process scoring it all) and all agree on early stopping."""
    # At the precision serving scores with on this device, not training's optim.amp: the checkpoint
    # is chosen for the scores it will serve.
    amp = inference_amp(ctx.device)
    sums = np.zeros(2, np.float64)
    for batch in val.epoch(0):
        sums += window_ndcg_sums(predict_logits(t.raw_model, batch, device=ctx.device, amp=amp), batch)
    total, count = ctx.all_reduce_sum(sums)
    return float(total / count) if count else float("nan")


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
    train: Batches | PaddedLists,
    val: Batches | PaddedLists,
    ctx: LoopContext,
    *,
    data_fingerprint: str | None = None,
) -> None:
    """Train with early stopping on `VAL_METRIC`; every epoch reports a resumable checkpoint.

    The recipe: set up, resume, then per epoch train, validate, report (metrics on every rank, the
    checkpoint from rank 0), and stop early once `optim.patience` epochs in a row did not improve.
    `data_fingerprint` (`file_fingerprint` of the data file) goes into each checkpoint's fingerprint
    with the config's (`run_fingerprint`); resuming from a checkpoint with another one raises.
    Padded arrays are batched in memory (`InMemoryBatches`) as this rank of ``ctx.world_size``.
    """
    o = cfg.optim
    if isinstance(train, PaddedLists):
        train = InMemoryBatches(train, o.batch_size, rank=ctx.rank, world_size=ctx.world_size)
    if isinstance(val, PaddedLists):
        val = InMemoryBatches(val, VALIDATION_BATCH, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    fingerprint = run_fingerprint(cfg, model_config, data_fingerprint)
    t = _setup(cfg, model_config, train, ctx)
    p = _resume(t, ctx, fingerprint)
    stopping = o.select == "best_val"
    if stopping and p.bad_epochs >= o.patience:
        return  # the checkpoint we resumed from had already triggered early stopping
    for epoch in range(p.start_epoch, o.max_epochs):
        losses, epoch_s = _train_epoch(cfg, t, epoch, ctx)
        val_metric = _validate(t, val, ctx)
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
            "train_samples_per_s_per_worker": train.num_lists / epoch_s,
        }
        ctx.report(metrics, _checkpoint(t, p, epoch, model_config, metrics, fingerprint) if ctx.rank == 0 else None)
        if cfg.scaling.fail_after_epoch == epoch and not p.resumed and ctx.rank == 0:
            raise RuntimeError(f"injected failure after epoch {epoch} (scaling.fail_after_epoch)")
        if stopping and p.bad_epochs >= o.patience:
            break
