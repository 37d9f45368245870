"""Checkpoint I/O: one `state.pt` per checkpoint directory, loaded with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cotrr_ray.core.model import Reranker, RerankerConfig


def save_state(state: dict[str, Any], directory: str | Path) -> None:
    torch.save(state, Path(directory) / "state.pt")


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def model_from_state(state: dict[str, Any], model_config: RerankerConfig) -> Reranker:
    """The `Reranker` of a training state (``state["model"]``), in eval mode."""
    model = Reranker(model_config)
    model.load_state_dict(state["model"])
    return model.eval()
