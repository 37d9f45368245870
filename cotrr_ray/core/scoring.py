"""Padded numpy lists -> tensors -> logits. Shared by validation, evaluation and the scorer."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cotrr_ray.core.features import PaddedLists


def to_tensors(batch: PaddedLists, device: torch.device | str) -> dict[str, object]:
    """Model keyword arguments for a padded batch (zero-copy on CPU)."""
    return {
        "candidate": {g: torch.from_numpy(v).to(device, non_blocking=True) for g, v in batch.candidate.items()},
        "query": {g: torch.from_numpy(v).to(device, non_blocking=True) for g, v in batch.query.items()},
        "context": torch.from_numpy(batch.context).to(device, non_blocking=True),
        "mask": torch.from_numpy(batch.mask).to(device, non_blocking=True),
    }


def inference_amp(device: torch.device | str) -> str:
    """The autocast of inference on `device`: bf16 on CUDA (fp16 where bf16 is unsupported), none on CPU.

    The one rule for every score that has to match a served one: the Scorer, checkpoint selection
    (validation) and the logits the calibrator is fitted on. Training's own `optim.amp` may differ.
    """
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


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
    if was_training:  # eval()/train() walk every submodule: only when the mode really changes
        model.eval()
    out = np.empty(lists.mask.shape, np.float32)
    n = len(lists)
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            # One chunk (the scorer's case): the batch as it is, no copy (the model never writes to its inputs).
            part = lists if (start == 0 and stop == n) else lists.take(np.arange(start, stop))
            with autocast(device, amp):
                logits = model(**to_tensors(part, device))
            out[start:stop] = logits.float().cpu().numpy()
    finally:
        if was_training:
            model.train(True)
    out[~lists.mask] = np.nan
    return out
