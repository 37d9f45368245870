"""The loop without Ray: a single process or one `torchrun` rank (GPU checks on a machine without Ray).

torchrun --nproc-per-node 2 -m cotrr_ray.training.torchrun --config configs/demo.yaml --data FILE scaling.use_gpu=true
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cotrr_ray.config import TrainConfig
from cotrr_ray.training.checkpoints import load_state, save_state
from cotrr_ray.training.loop import all_reduce_sum, fit
from cotrr_ray.training.prepare import prepare_data


class TorchContext:
    """Single process, or one rank under `torchrun`; checkpoints go to `checkpoint_dir/epoch_NNN`."""

    def __init__(self, checkpoint_dir: str | Path, use_gpu: bool = False):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = use_gpu and torch.cuda.is_available()
        if use_gpu and not cuda:
            raise RuntimeError("scaling.use_gpu=true but torch sees no CUDA device")
        self.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.history: list[dict[str, float]] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return all_reduce_sum(values, self.world_size, self.device)

    def load_checkpoint(self) -> dict[str, Any] | None:
        done = sorted(self.checkpoint_dir.glob("epoch_[0-9][0-9][0-9]/state.pt"))  # not epoch_NNN.tmp/
        return load_state(done[-1].parent) if done else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.history.append(metrics)
        if self.rank == 0 and state is not None:
            d = self.checkpoint_dir / f"epoch_{int(metrics['epoch']):03d}"
            tmp = d.with_suffix(".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_state(state, tmp)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)  # atomic: a crash never leaves a half-written "latest" checkpoint
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
        if self.world_size > 1:
            torch.distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the training loop without Ray (single process or torchrun).")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="training data file (JSONL or LETOR per the config)")
    p.add_argument("--checkpoint-dir", default="artifacts/torchrun_ckpt")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    data = prepare_data(cfg, args.data)
    ctx = TorchContext(args.checkpoint_dir, use_gpu=cfg.scaling.use_gpu)
    fit(
        cfg,
        data.model_config,
        data.padded["train"],
        data.padded["validation"],
        ctx,
        data_fingerprint=data.data_fingerprint,
    )
    if ctx.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
