"""Checkpoint I/O: one `state.pt` per checkpoint directory, loaded with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_state(state: dict[str, Any], directory: str | Path) -> None:
    torch.save(state, Path(directory) / "state.pt")


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
