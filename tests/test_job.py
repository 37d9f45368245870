"""End to end through a real local Ray: 2 Ray Train workers, an injected worker failure, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from factories import tiny_train_config

from cotrr_ray.config import FAULT_INJECTION_ENV

pytestmark = pytest.mark.integration

MAX_EPOCHS = 3


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        # The Train workers validate scaling.fail_after_epoch again: they inherit the gate from here.
        os.environ[FAULT_INJECTION_ENV] = "1"
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    # A Ray instance another fixture started (e.g. the session's Serve cluster) is shared and left
    # alone. One started here is shut down, because conftest's `serve_session` calls ray.init()
    # unconditionally and would fail ("called ray.init twice") if a later module requested it.
    if started_here:
        ray.shutdown()
        os.environ.pop(FAULT_INJECTION_ENV, None)


def _retried_after_injected_failure(ray, run_name: str) -> bool:
    """Whether this Ray session's Train controller logged a RETRY of `run_name` caused by the
    injected failure (the controller logs are JSON lines tagged with the run name)."""
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    for f in (session / "logs" / "train").glob("*controller*.log"):
        for line in f.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = str(rec.get("message", "")) + str(rec.get("exc_text", ""))
            if (
                rec.get("run_name") == run_name
                and "[FailurePolicy] RETRY" in text
                and "injected failure after epoch 0" in text
            ):
                return True
    return False


def test_two_worker_job_resumes_after_injected_failure(ray_local, fault_injection, tmp_path: Path) -> None:
    from cotrr_ray.bundles.bundle import Bundle
    from cotrr_ray.training.job import run

    run_name = f"cotrr-test-resume-{tmp_path.name}"
    cfg = tiny_train_config(
        tmp_path,
        [
            "data.generate={queries: 300, seed: 0, min_candidates: 10, max_candidates: 14}",
            f"optim.max_epochs={MAX_EPOCHS}",
            "optim.patience=50",
            "scaling.num_workers=2",
            "scaling.max_failures=1",
            "scaling.fail_after_epoch=0",
            f"scaling.storage_path={tmp_path / 'ray_results'}",
            f"scaling.run_name={run_name}",
            "calibration.min_samples=10",
        ],
    )
    said: list[str] = []
    published = run(cfg, say=said.append)

    # Published into the registry `output` names, under the new bundle's own id.
    out = published.local_dir()
    assert out == tmp_path / "bundle" / published.bundle_id and published.uri == str(out)
    bundle = Bundle.load(out)
    assert bundle.bundle_id == published.bundle_id and published.alias is None
    assert bundle.top_m == 8 and bundle.model_config.d_model == 32

    metrics = json.loads((out / "metrics.json").read_text())
    # The worker group failed after epoch 0, was restarted from the epoch-0 checkpoint and finished.
    assert metrics["final_epoch"]["epoch"] == MAX_EPOCHS - 1
    assert 0 <= metrics["best_checkpoint"]["epoch"] <= MAX_EPOCHS - 1
    assert sum(metrics["splits"].values()) == 300

    # The held-out test report exists, with every metric and both calibration variants.
    report = metrics["test"]
    assert report["queries"] > 0
    for m in ("ndcg@1", "ndcg@5", "ndcg@10", "mrr"):
        assert {"model", "upstream", "oracle", "model_ci"} <= set(report[m])
    assert {"raw", "calibrated"} == set(report["calibration"])
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("held-out test queries") and "ndcg@10" in line for line in said)
    assert bundle.manifest["headline_metrics"]["test_ndcg@10_model"] == report["ndcg@10"]["model"]

    # The injected failure really happened and Ray Train restarted the worker group because of it,
    # so the finished run above is a resumed one.
    assert _retried_after_injected_failure(ray_local, run_name)


def test_job_on_s3_checkpoints_resume_and_publish_with_an_alias(
    ray_local, fault_injection, s3_bucket, tmp_path, monkeypatch
) -> None:
    """The registry and Ray Train's storage both on the loopback S3 server: no shared directory at all.
    The injected failure makes the restarted worker group resume from a checkpoint read back from S3."""
    from cotrr_ray import storage
    from cotrr_ray.bundles.bundle import Bundle
    from cotrr_ray.bundles.registry import Registry
    from cotrr_ray.training.job import run

    monkeypatch.setenv("COTRR_BUNDLE_CACHE", str(tmp_path / "cache"))
    registry = f"{s3_bucket}/{tmp_path.name}/registry"
    run_name = f"cotrr-test-s3-{tmp_path.name}"
    cfg = tiny_train_config(
        tmp_path,
        [
            f"output={registry}/demo",
            "alias=candidate",
            "data.generate={queries: 200, seed: 0, min_candidates: 10, max_candidates: 14}",
            "optim.max_epochs=2",
            "scaling.num_workers=2",
            "scaling.max_failures=1",
            "scaling.fail_after_epoch=0",
            f"scaling.run_name={run_name}",
            "calibration.min_samples=10",
        ],
    )
    published = run(cfg, say=lambda _: None)

    assert published.uri == f"{registry}/demo/{published.bundle_id}"
    reg = Registry(registry)
    assert reg.resolve("demo", "candidate") == published.bundle_id and published.alias.previous is None
    local = published.local_dir()
    assert local == tmp_path / "cache" / published.bundle_id
    assert Bundle.load(local).manifest["headline_metrics"]["test_ndcg@10_model"] > 0
    # Ray Train's checkpoints went to <registry>/_runs on S3, and the run really restarted from one.
    run_dir = storage.locate(f"{registry}/_runs/{run_name}")
    assert any(name.startswith("checkpoint_") for name, is_dir in storage.list_dir(run_dir) if is_dir)
    assert json.loads((local / "metrics.json").read_text())["final_epoch"]["epoch"] == 1
    assert _retried_after_injected_failure(ray_local, run_name)


def test_local_mode_keeps_only_this_runs_epochs_and_refuses_another_runs(ray_local, tmp_path: Path) -> None:
    """Ray Train local mode (num_workers=0) keeps its epochs under storage/run_name; a rerun under the
    same name picks its model only among epochs with its own fingerprint, and a rerun with another
    config refuses to resume the old weights."""
    import torch

    from cotrr_ray.data.synthetic import generate
    from cotrr_ray.training.checkpoints import load_state
    from cotrr_ray.training.ingest import open_training_data, parquet_source
    from cotrr_ray.training.job import run_ray_train
    from cotrr_ray.training.loop import VAL_METRIC

    path = generate(
        tmp_path / "d.jsonl", queries=60, seed=0, min_candidates=10, max_candidates=12, top_m=8, progress=False
    )
    base = [
        "data.splits={train: 0.7, validation: 0.3, test: 0.0}",
        "optim.max_epochs=2",
        "scaling.num_workers=0",
        f"scaling.storage_path={tmp_path / 'ray_results'}",
        "scaling.run_name=same-name",
    ]
    cfg = tiny_train_config(tmp_path, base)
    data = open_training_data(cfg, parquet_source(cfg, path, say=lambda _: None))
    storage = tmp_path / "ray_results"
    first = run_ray_train(cfg, data, storage)
    local = storage / "same-name" / "local_checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["epoch_000", "epoch_001"]
    mine = first["fingerprint"]
    assert mine["data"] == data.data_fingerprint is not None

    # A stale epoch of another run, with a validation score nothing of ours can beat.
    stale = load_state(local / "epoch_000")
    stale["fingerprint"] = {"config": "sha256:someone-else", "data": mine["data"]}
    stale["metrics"] = {**stale["metrics"], VAL_METRIC: 99.0}
    torch.save(stale, local / "epoch_000" / "state.pt")
    again = run_ray_train(cfg, data, storage)  # resumes the finished run: nothing left to train
    assert again["epoch"] == 1 and again["fingerprint"] == mine

    other = tiny_train_config(tmp_path, [*base, "optim.lr=0.0001"])
    with pytest.raises(Exception, match="refusing to resume") as err:
        run_ray_train(other, data, storage)
    assert "config fingerprint differs" in str(err.value)
