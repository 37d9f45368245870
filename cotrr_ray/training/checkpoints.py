"""Checkpoint I/O: one `state.pt` per checkpoint directory, loaded with `weights_only=True`.

A training state carries the fingerprint of the run that wrote it (`run_fingerprint`): its training
config without the knobs that only say how or where it runs, and its data. Ray Train resumes by run
name, so `check_resumable` is what stops a run from continuing someone else's weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cotrr_ray.config import TrainConfig
from cotrr_ray.core.model import Reranker, RerankerConfig

# What a rerun may change and still continue the same weights: how many workers, where results and
# the bundle go, and the post-training phases (calibration, bootstrap). `alias` keys go too, at any
# depth: a name for a thing, not the thing.
RUN_KNOBS = {"scaling": True, "output": True, "bootstrap_samples": True, "calibration": True, "data": {"cache_dir"}}


class ResumeMismatchError(RuntimeError):
    """A checkpoint written by a run with another training config or other data."""


def _without_aliases(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_aliases(v) for k, v in node.items() if k != "alias"}
    if isinstance(node, list):
        return [_without_aliases(v) for v in node]
    return node


def config_fingerprint(cfg: TrainConfig, model_config: RerankerConfig) -> str:
    """sha256 of what decides the weights: `cfg` without `RUN_KNOBS`, and the model's architecture."""
    what = {"train": _without_aliases(cfg.model_dump(mode="json", exclude=RUN_KNOBS)), "model": model_config.to_dict()}
    return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_fingerprint(cfg: TrainConfig, model_config: RerankerConfig, data_fingerprint: str | None) -> dict[str, Any]:
    """The fingerprint every checkpoint of this run carries (``state["fingerprint"]``)."""
    return {"config": config_fingerprint(cfg, model_config), "data": data_fingerprint}


def check_resumable(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise `ResumeMismatchError` unless `state` was written by a run with the `expected` fingerprint."""
    got = state.get("fingerprint") or {"config": None, "data": None}
    differ = [k for k in ("config", "data") if got.get(k) != expected[k]]
    if not differ:
        return
    raise ResumeMismatchError(
        f"refusing to resume from the checkpoint of epoch {state.get('epoch')}: it was written by another "
        f"training run (the {' and '.join(differ)} fingerprint{'s differ' if len(differ) > 1 else ' differs'}). "
        f"Checkpoint: config {got.get('config')}, data {got.get('data')}; "
        f"this run: config {expected['config']}, data {expected['data']}. "
        "Ray Train resumes by scaling.run_name: give this run a new run_name (or delete the old run's "
        "checkpoints) to train from scratch, or rerun with the old config and data to continue it."
    )


def save_state(state: dict[str, Any], directory: str | Path) -> None:
    """Write ``directory/state.pt`` atomically: a killed write leaves the previous file or none, never
    a torn one (resume and the local-mode collection read whatever state.pt they find)."""
    path = Path(directory) / "state.pt"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state.pt.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def kept_epochs(directory: str | Path, fingerprint: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, metrics) of each ``epoch_*/state.pt`` under `directory` written with `fingerprint`,
    in epoch order. An earlier run under the same run name may have left epochs of another config or
    data there; they are never candidates for this run's model."""
    out = []
    for path in sorted(Path(directory).glob("epoch_*/state.pt")):
        state = load_state(path.parent)
        if state.get("fingerprint") == fingerprint:
            out.append((path.parent, state["metrics"]))
    return out


def model_from_state(state: dict[str, Any], model_config: RerankerConfig) -> Reranker:
    """The `Reranker` of a training state (``state["model"]``), in eval mode."""
    model = Reranker(model_config)
    model.load_state_dict(state["model"])
    return model.eval()
