from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cotrr_ray.config import FAULT_INJECTION_ENV, AppArgs, RoutingConfig, ScorerConfig, TrainConfig, apply_override
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_demo_yaml_loads() -> None:
    cfg = TrainConfig.from_yaml(DEMO)
    assert cfg.scaling.num_workers == 2 and cfg.optim.amp == "bf16"
    assert cfg.model.top_m == 20 and cfg.model.d_model % cfg.model.n_heads == 0
    assert cfg.data.path is None and cfg.data.feature_spec == IMAGE_SEARCH_SPEC


def test_defaults_without_a_file() -> None:
    cfg = TrainConfig.from_yaml(None)
    assert cfg == TrainConfig()
    assert set(cfg.data.splits) == {"train", "validation", "calibration", "test"}
    assert abs(sum(cfg.data.splits.values()) - 1) < 1e-9


def test_overrides_are_yaml_typed_and_nested(fault_injection) -> None:
    cfg = TrainConfig.from_yaml(
        DEMO,
        [
            "optim.lr=0.01",
            "optim.max_epochs=3",
            "optim.amp=none",
            "optim.compile=true",
            "model.d_model=64",
            "data.path=/some/file.jsonl",
            "data.generate.queries=50",
            "scaling.fail_after_epoch=1",
            "scaling.storage_path=null",
            "data.splits={train: 0.5, validation: 0.25, test: 0.25}",
        ],
    )
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_epochs == 3 and cfg.optim.amp == "none" and cfg.optim.compile is True
    assert cfg.model.d_model == 64
    assert cfg.model.n_heads == TrainConfig.from_yaml(DEMO).model.n_heads  # untouched keys keep the file's value
    assert cfg.data.path == "/some/file.jsonl" and cfg.data.generate.queries == 50
    assert cfg.data.generate.seed == 0
    assert cfg.scaling.fail_after_epoch == 1 and cfg.scaling.storage_path is None
    assert cfg.data.splits == {"train": 0.5, "validation": 0.25, "test": 0.25}


def test_exponent_notation_lr() -> None:
    # PyYAML reads "1e-3" as a string (YAML 1.1 needs a dot); the float field must still accept it.
    assert TrainConfig.from_yaml(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_later_override_wins_and_file_is_not_mutated() -> None:
    text = DEMO.read_text()
    cfg = TrainConfig.from_yaml(DEMO, ["optim.lr=0.1", "optim.lr=0.2"])
    assert cfg.optim.lr == 0.2
    assert DEMO.read_text() == text


@pytest.mark.parametrize(
    "override",
    ["optim.learning_rate=0.1", "modle.d_model=64", "scaling.gpus=1", "toplevel=1", "data.generate.qs=5"],
)
def test_unknown_keys_rejected(override: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainConfig.from_yaml(DEMO, [override])


def test_unknown_key_in_yaml_file_rejected(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 0.1, warmup: 3}\n")
    with pytest.raises(ValidationError, match="warmup"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0",
        "optim.lr=abc",
        "optim.amp=fp8",
        "model.dropout=1.0",
        "scaling.num_workers=-1",
        "optim.grad_accum_steps=0",
    ],
)
def test_invalid_values_rejected(override: str) -> None:
    with pytest.raises(ValidationError):
        TrainConfig.from_yaml(DEMO, [override])


def test_malformed_overrides_rejected() -> None:
    with pytest.raises(ValueError, match="key.path=value"):
        TrainConfig.from_yaml(DEMO, ["optim.lr"])
    with pytest.raises(ValueError, match="not a section"):
        TrainConfig.from_yaml(DEMO, ["output.sub=1"])  # output is a string, not a section


def test_apply_override_value_may_contain_equals() -> None:
    raw: dict = {}
    apply_override(raw, "data.split_salt=a=b")
    assert raw == {"data": {"split_salt": "a=b"}}


@pytest.mark.parametrize(
    "splits, fragment",
    [
        ("{train: 0.7, validation: 0.2, test: 0.2}", "sum to 1"),
        ("{train: 0.5, validation: 0.2, test: 0.2}", "sum to 1"),
        ("{train: 0.8, test: 0.2}", "validation"),
        ("{train: 0.8, validation: 0.2}", "test"),
    ],
)
def test_split_fractions_validated(splits: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        TrainConfig.from_yaml(None, [f"data.splits={splits}"])


def test_feature_spec_from_config_is_validated() -> None:
    cfg = TrainConfig.from_yaml(
        None, ["data.feature_spec={version: x, candidate: {f: 4}, transforms: {candidate.f: none}}"]
    )
    assert cfg.data.feature_spec.candidate == {"f": 4}
    assert cfg.data.feature_spec.transform_for("candidate", "f") == "none"
    with pytest.raises(ValidationError):
        TrainConfig.from_yaml(None, ["data.feature_spec={version: x, candidate: {f: 0}}"])


def test_fault_injection_is_refused_unless_the_env_var_is_set(monkeypatch) -> None:
    # A production `serve deploy` or training job must not be able to switch faults on by a config edit.
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)
    for make in (
        lambda: ScorerConfig(fault="raise"),
        lambda: ScorerConfig.model_validate({"fault": "slow", "fault_delay_s": 2.0}),
        lambda: AppArgs.model_validate({"control_scorer": {"fault": "raise"}}),
        lambda: TrainConfig.from_yaml(None, ["scaling.fail_after_epoch=0"]),
    ):
        with pytest.raises(ValidationError, match=f"{FAULT_INJECTION_ENV}=1"):
            make()
    monkeypatch.setenv(FAULT_INJECTION_ENV, "0")
    with pytest.raises(ValidationError, match=FAULT_INJECTION_ENV):
        ScorerConfig(fault="raise")
    # The settings' off values never need it.
    assert ScorerConfig().fault == "none" and ScorerConfig(fault="none", fault_delay_s=1.0).fault_delay_s == 1.0
    assert TrainConfig.from_yaml(None, ["scaling.fail_after_epoch=null"]).scaling.fail_after_epoch is None

    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")
    assert ScorerConfig(fault="raise").fault == "raise"
    assert AppArgs.model_validate({"scorer": {"fault": "slow"}}).scorer.fault == "slow"
    assert TrainConfig.from_yaml(None, ["scaling.fail_after_epoch=0"]).scaling.fail_after_epoch == 0


@pytest.mark.parametrize("rollout", [0.005, 12.345, 99.999])
def test_rollout_percentage_finer_than_a_basis_point_is_rejected(rollout: float) -> None:
    # Buckets are basis points: 0.005 would be logged as the rollout while nobody is assigned.
    with pytest.raises(ValidationError, match="multiple of 0.01"):
        RoutingConfig(rollout_percentage=rollout)


@pytest.mark.parametrize("rollout", [0, 0.01, 0.07, 0.5, 33.33, 100])
def test_rollout_percentage_in_basis_points_is_accepted(rollout: float) -> None:
    assert RoutingConfig(rollout_percentage=rollout).rollout_percentage == rollout
