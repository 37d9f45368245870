"""Shared fixtures: tiny real bundles (session) and one local Ray Serve instance (session, lazy).

Only tests that request `serve_session` start Ray; everything else stays Ray-free.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from _bundles import make_bundle, make_data, read_records
from _page_app import _page_app  # noqa: F401 (the session's page_app fixture: the experiment page's Serve app)

from cotrr_ray.config import FAULT_INJECTION_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from kit.s3 import LoopbackS3, env_for, free_port  # noqa: E402

# The loopback S3 server starts at import and its address goes into this process's environment,
# before any test starts Ray: every worker and replica inherits it, so s3:// means the loopback
# server everywhere (and never a developer's real AWS account). Started now, not on first use: a
# port picked here and bound minutes later was once taken by a Ray process in between, failing
# every S3 test of the run.
S3 = LoopbackS3(free_port(), log=Path(tempfile.gettempdir()) / f"cotrr-tests-moto-{os.getpid()}.log").start()
atexit.register(S3.stop)
os.environ.update(env_for(S3.port))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box threads competing
    with another process make the tests many times slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def fault_injection(monkeypatch) -> None:
    """Open the fault-injection gate (ScorerConfig.fault, scaling.fail_after_epoch) in this process."""
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1")


@pytest.fixture(scope="session")
def test_data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "lists.jsonl")


@pytest.fixture(scope="session")
def bundle_a(tmp_path_factory, test_data) -> Path:
    """The treatment bundle."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "a", test_data, seed=0, steps=30)


@pytest.fixture(scope="session")
def bundle_b(tmp_path_factory, test_data) -> Path:
    """A second bundle with the same spec and different weights (control / hot swap)."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "b", test_data, seed=1, steps=10)


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """`s3://cotrr-test` on a real S3-compatible server (moto's standalone server) on loopback."""
    return S3.create_bucket("cotrr-test")


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path) -> str:
    """A fresh, empty registry root: a local directory, then a prefix on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:12]}/registry"


@pytest.fixture(scope="session")
def records(test_data) -> list[dict]:
    return read_records(test_data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeSession:
    http_url: str
    dashboard_url: str
    metrics_url: str
    http_port: int


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one module's jobs and Ray Data pipelines (4 logical CPUs: two Train workers
    and Ray Data's reads beside them). The session's Serve cluster, when already up, is shared and
    left alone; one started here is shut down at the module's end, because `serve_session` calls
    ray.init() unconditionally later."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_session():
    """One local Ray cluster + Serve for the whole session (never attaches to a running cluster).

    Ports are picked free at start so parallel sessions on the box do not collide. The dashboard is
    on because `serve deploy` (the config path for live user_config changes) talks to it.
    """
    import ray
    from ray import serve

    http_port, dashboard_port, metrics_port = _free_port(), _free_port(), _free_port()
    # The fault tests switch ScorerConfig.fault through user_config and the Scorer replicas validate
    # it, so this Ray's processes need the gate open: set before ray.init, the raylet and every worker
    # it starts inherit it (the job's runtime_env carries it too).
    os.environ[FAULT_INJECTION_ENV] = "1"
    ray.init(
        address="local",
        num_cpus=8,  # logical; replicas reserve 0.25-1 each
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", FAULT_INJECTION_ENV: "1"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield ServeSession(
            http_url=f"http://127.0.0.1:{http_port}",
            dashboard_url=f"http://127.0.0.1:{dashboard_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            http_port=http_port,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(FAULT_INJECTION_ENV, None)


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for Ray CLI calls against the session cluster (token auth is on by default)."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}
