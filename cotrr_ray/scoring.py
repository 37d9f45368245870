"""Padded numpy lists -> tensors -> logits. Shared by validation, evaluation and the scorer."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cotrr_ray.features import PaddedLists


def to_tensors(batch: PaddedLists, device: torch.device | str) -> dict[str, object]:
    """Model keyword arguments for a padded batch (zero-copy on CPU)."""
    return {
        "candidate": {g: torch.from_numpy(v).to(device, non_blocking=True) for g, v in batch.candidate.items()},
        "query": {g: torch.from_numpy(v).to(device, non_blocking=True) for g, v in batch.query.items()},
        "context": torch.from_numpy(batch.context).to(device, non_blocking=True),
        "mask": torch.from_numpy(batch.mask).to(device, non_blocking=True),
    }


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on `device`, or a no-op for amp='none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use amp='bf16' on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    lists: PaddedLists,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    amp: str = "none",
) -> np.ndarray:
    """(N, M) float32 logits; padded positions are NaN so they can never be ranked by accident."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = np.empty(lists.mask.shape, np.float32)
    try:
        for start in range(0, len(lists), batch_size):
            idx = np.arange(start, min(start + batch_size, len(lists)))
            with autocast(device, amp):
                logits = model(**to_tensors(lists.take(idx), device))
            out[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    out[~lists.mask] = np.nan
    return out
