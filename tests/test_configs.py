"""Every shipped YAML loads into its schema; build_app resolves paths and fails closed.

serve_config.yaml -> ray.serve.schema.ServeDeploySchema, its args -> AppArgs, its user_configs ->
RoutingConfig / ScorerConfig; every configs/**/*.yaml and packaged cotrr_ray/configs/*.yaml -> TrainConfig.
The packaged configs (what `python -m cotrr_ray.demo` reads) are found from outside the repo root. No
Ray cluster is started (binding a deployment graph does not need one).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cotrr_ray import demo
from cotrr_ray.bundles.bundle import BundleError, read_meta
from cotrr_ray.config import FAULT_INJECTION_ENV, AppArgs, RoutingConfig, ScorerConfig, TrainConfig
from cotrr_ray.serving.app import build_app

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "cotrr_ray" / "configs"  # package data: the configs the demo reads
SERVE_CONFIGS = sorted(ROOT.glob("serve_config*.yaml")) + sorted(PACKAGED.glob("serve_config*.yaml"))
ROLLOUT_PLANS = ROOT / "configs" / "rollouts"  # RolloutPlan files, loaded by tests/test_rollout.py
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if ROLLOUT_PLANS not in p.parents) + sorted(
    p for p in PACKAGED.glob("*.yaml") if not p.name.startswith("serve_config")
)
USER_CONFIG_SCHEMA = {"Router": RoutingConfig, "Scorer": ScorerConfig, "ScorerControl": ScorerConfig}


def test_configs_are_found() -> None:
    assert ROOT / "serve_config.yaml" in SERVE_CONFIGS
    assert ROOT / "configs" / "demo.yaml" in TRAIN_CONFIGS
    assert PACKAGED / "demo.yaml" in TRAIN_CONFIGS
    assert PACKAGED / "serve_config.yaml" in SERVE_CONFIGS


def test_repo_demo_config_is_the_packaged_file() -> None:
    # One source of truth: configs/demo.yaml (README, cluster/, train_job.py usage) links to the package data.
    assert (ROOT / "configs" / "demo.yaml").samefile(PACKAGED / "demo.yaml")


def test_packaged_serve_config_is_the_repo_one() -> None:
    # serve_config.yaml stays at the repo root (serve run / cluster/ read it); the package links to it, so
    # a wheel build copies its content and the two can never drift.
    assert (PACKAGED / "serve_config.yaml").samefile(ROOT / "serve_config.yaml")


def test_demo_finds_its_configs_outside_the_repo_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = demo.packaged_config("demo.yaml")
    assert path.resolve() == (PACKAGED / "demo.yaml").resolve()
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.output, cfg.alias) == ("artifacts/registry/demo", "production")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        demo.packaged_config("missing.yaml")


def test_demo_config_lookup_from_an_installed_copy(tmp_path) -> None:
    """What a wheel installs (the package's .py files plus pyproject's package-data), outside any checkout."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["cotrr_ray"]
    site = tmp_path / "site"
    src = ROOT / "cotrr_ray"
    shipped = {p for p in src.rglob("*.py") if "__pycache__" not in p.parts}
    shipped |= {p for pattern in patterns for p in src.glob(pattern)}
    for p in shipped:
        (site / "cotrr_ray" / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, site / "cotrr_ray" / p.relative_to(src))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    code = (
        "from cotrr_ray import demo; from cotrr_ray.config import TrainConfig; "
        "print(demo.__file__); print(demo.packaged_config('demo.yaml')); print(demo.default_serve_config()); "
        "print(demo.work_dir()); TrainConfig.from_yaml(demo.packaged_config('demo.yaml'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    module, config, serve_config, workdir = out.stdout.split()
    assert Path(module).is_relative_to(site)
    assert Path(config) == site / "cotrr_ray" / "configs" / "demo.yaml"
    assert Path(serve_config) == site / "cotrr_ray" / "configs" / "serve_config.yaml"
    assert Path(workdir) == cwd


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_serve_config_validates(path: Path, monkeypatch) -> None:
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)  # what ships validates where faults are refused
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
    demo = TrainConfig.from_yaml(PACKAGED / "demo.yaml")
    assert args.bundle_uri == f"{demo.output}@{demo.alias}"  # serves the alias the demo moves, never its output dir


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_train_config_validates(path: Path, monkeypatch) -> None:
    monkeypatch.delenv(FAULT_INJECTION_ENV, raising=False)  # no shipped config may need the fault gate
    TrainConfig.from_yaml(path)


def test_build_app_resolves_relative_paths_against_the_cwd(bundle_a, tmp_path, monkeypatch) -> None:
    from cotrr_ray.bundles.registry import Registry

    registry = Registry(tmp_path / "artifacts" / "registry")
    registry.publish(bundle_a, "demo")
    registry.set_alias("demo", "production", read_meta(bundle_a).bundle_id)
    monkeypatch.chdir(tmp_path)
    app = build_app(AppArgs(exposure_log_path="logs/exposure.jsonl"))
    router = app._bound_deployment  # the bound Router and its init args
    args = router.init_args[3]
    assert args.bundle_uri == f"{tmp_path / 'artifacts' / 'registry' / 'demo'}@production"
    assert args.exposure_log_path == str(tmp_path / "logs" / "exposure.jsonl")


def test_build_app_fails_closed_with_the_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match=f"no registry at {tmp_path / 'artifacts' / 'registry'}"):
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
