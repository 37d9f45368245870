"""Checkpoint files (cotrr_ray.training.checkpoints): atomic writes, run fingerprints, this run's epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import tiny_model_config, tiny_train_config

from cotrr_ray.config import TrainConfig
from cotrr_ray.training import checkpoints
from cotrr_ray.training.checkpoints import config_fingerprint, kept_epochs, load_state, run_fingerprint, save_state


def _state(epoch: int, fingerprint: dict | None) -> dict:
    return {
        "model": {"w": torch.full((3,), float(epoch))},
        "epoch": epoch,
        "metrics": {"epoch": epoch},
        "fingerprint": fingerprint,
    }


def test_a_killed_write_leaves_the_previous_state_whole(tmp_path: Path, monkeypatch) -> None:
    save_state(_state(0, None), tmp_path)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        # Half of the bytes, then the process "dies" (here: an exception out of the write).
        target = open(f, "wb") if isinstance(f, str | Path) else f
        target.write(b"\x80\x02torn")
        target.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoints.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_state(_state(1, None), tmp_path)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert load_state(tmp_path)["epoch"] == 0  # the old file, readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # and no temporary left behind
    save_state(_state(2, None), tmp_path)
    assert load_state(tmp_path)["epoch"] == 2


def test_config_fingerprint_ignores_run_knobs_only(tmp_path: Path) -> None:
    mc = tiny_model_config()
    base = tiny_train_config(tmp_path)
    same = [
        "output=/elsewhere/bundle",
        "bootstrap_samples=5000",
        "calibration.method=cross_fit",
        "calibration.folds=3",
        "data.cache_dir=/other/cache",
        "scaling.num_workers=8",
        "scaling.use_gpu=true",
        "scaling.storage_path=s3://bucket/runs",
        "scaling.run_name=r2",
    ]
    for override in same:
        assert config_fingerprint(tiny_train_config(tmp_path, [override]), mc) == config_fingerprint(base, mc), override
    different = [
        "optim.lr=0.01",
        "optim.max_epochs=9",
        "optim.seed=1",
        "optim.amp=bf16",
        "model.dropout=0.2",
        "data.split_salt=other",
        "data.relevance_threshold=2",
        "data.generate.seed=3",
    ]
    for override in different:
        assert config_fingerprint(tiny_train_config(tmp_path, [override]), mc) != config_fingerprint(base, mc), override
    # The architecture is part of it even where the TrainConfig is the same (a caller's own model config).
    assert config_fingerprint(base, tiny_model_config(d_model=64)) != config_fingerprint(base, mc)


def test_alias_fields_are_not_part_of_the_fingerprint() -> None:
    assert checkpoints._without_aliases({"a": 1, "alias": "x", "b": [{"alias": "y", "c": 2}]}) == {
        "a": 1,
        "b": [{"c": 2}],
    }


def test_fingerprint_survives_the_workers_config_round_trip(tmp_path: Path) -> None:
    # The driver fingerprints `cfg`; a Ray Train worker fingerprints TrainConfig.model_validate of its
    # JSON dump (the loop config). They must agree, or local mode would keep none of the run's epochs.
    cfg = tiny_train_config(tmp_path, ["data.feature_spec={version: x, candidate: {f: 4}}"])
    again = TrainConfig.model_validate(cfg.model_dump(mode="json"))
    mc = tiny_model_config()
    assert run_fingerprint(again, mc, "sha256:d") == run_fingerprint(cfg, mc, "sha256:d")


def test_kept_epochs_are_only_this_runs(tmp_path: Path) -> None:
    # Epochs an earlier run under the same run name left behind (another config or data) are never
    # candidates for this run's model, whatever their metrics.
    mine = {"config": "sha256:c", "data": "sha256:d"}
    layout = {
        "epoch_000": mine,
        "epoch_001": {"config": "sha256:c", "data": "sha256:other"},
        "epoch_002": mine,
        "epoch_003": {"config": "sha256:other", "data": "sha256:d"},
        "epoch_004": None,
    }
    for name, fp in layout.items():
        (tmp_path / name).mkdir()
        save_state(_state(int(name[-3:]), fp), tmp_path / name)
    (tmp_path / "epoch_005").mkdir()  # a directory whose write never finished: no state.pt
    kept = kept_epochs(tmp_path, mine)
    assert [(d.name, m["epoch"]) for d, m in kept] == [("epoch_000", 0), ("epoch_002", 2)]
    assert kept_epochs(tmp_path, {"config": "sha256:x", "data": None}) == []
