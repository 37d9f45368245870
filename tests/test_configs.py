"""Every shipped YAML loads into its schema; build_app resolves paths and fails closed.

serve_config.yaml -> ray.serve.schema.ServeDeploySchema, its args -> AppArgs, its user_configs ->
RoutingConfig / ScorerConfig; every configs/**/*.yaml -> TrainConfig. No Ray cluster is started
(binding a deployment graph does not need one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cotrr_ray.bundles.bundle import BundleError
from cotrr_ray.config import AppArgs, RoutingConfig, ScorerConfig, TrainConfig
from cotrr_ray.serving.app import build_app

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = sorted(ROOT.glob("serve_config*.yaml"))
TRAIN_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
USER_CONFIG_SCHEMA = {"Router": RoutingConfig, "Scorer": ScorerConfig, "ScorerControl": ScorerConfig}


def test_configs_are_found() -> None:
    assert ROOT / "serve_config.yaml" in SERVE_CONFIGS
    assert ROOT / "configs" / "demo.yaml" in TRAIN_CONFIGS


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    for app in schema.applications:
        assert app.import_path == "cotrr_ray.serving.app:build_app"
        args = AppArgs.model_validate(app.args)
        names = {d.name for d in app.deployments}
        assert names <= {"Router", "Scorer", "Calibrator", "ScorerControl"}, names
        assert ("ScorerControl" in names) <= (args.control_bundle_uri is not None)
        for d in app.deployments:
            if d.name in USER_CONFIG_SCHEMA and "user_config" in d.model_fields_set:
                cfg = USER_CONFIG_SCHEMA[d.name].model_validate(d.user_config)
                if isinstance(cfg, ScorerConfig):
                    assert cfg.fault == "none", "fault injection is for tests only"
                    assert d.max_ongoing_requests >= cfg.max_batch_size
            assert "num_replicas" not in d.model_fields_set or d.num_replicas == "auto" or d.autoscaling_config is None


def test_default_serve_config_reads_the_demo_bundle() -> None:
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    args = AppArgs.model_validate(raw["applications"][0]["args"])
    assert args.bundle_uri == TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml").output


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_train_config_validates(path: Path) -> None:
    TrainConfig.from_yaml(path)


def test_build_app_resolves_relative_paths_against_the_cwd(bundle_a, tmp_path, monkeypatch) -> None:
    shutil.copytree(bundle_a, tmp_path / "artifacts" / "bundles" / "demo")
    monkeypatch.chdir(tmp_path)
    app = build_app(AppArgs(exposure_log_path="logs/exposure.jsonl"))
    router = app._bound_deployment  # the bound Router and its init args
    args = router.init_args[3]
    assert args.bundle_uri == str(tmp_path / "artifacts" / "bundles" / "demo")
    assert args.exposure_log_path == str(tmp_path / "logs" / "exposure.jsonl")


def test_build_app_fails_closed_with_the_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match=str(tmp_path / "artifacts" / "bundles" / "demo")):
        build_app(AppArgs())


def test_build_app_checks_the_control_bundle_and_top_m(bundle_a, bundle_b, tmp_path) -> None:
    build_app(AppArgs(bundle_uri=str(bundle_a), control_bundle_uri=str(bundle_b)))
    with pytest.raises(BundleError):
        build_app(AppArgs(bundle_uri=str(bundle_a), control_bundle_uri=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="top_m"):
        build_app(AppArgs(bundle_uri=str(bundle_a), routing=RoutingConfig(top_m=1000)))


def test_annotations_are_real_classes_for_serve_and_fastapi() -> None:
    # Serve validates YAML `args` through build_app's annotation, and FastAPI injects the raw
    # Request through the ingress method's annotation; string annotations (PEP 563) break both.
    import inspect

    from fastapi import Request

    from cotrr_ray.serving.deployments import Router

    assert inspect.signature(build_app).parameters["args"].annotation is AppArgs
    user_class = Router.func_or_class.__bases__[0]
    assert inspect.signature(user_class.rerank).parameters["request"].annotation is Request
