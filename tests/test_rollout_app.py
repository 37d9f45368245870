"""The live rollout scenarios (bench/rollout_live.py) on the test session's Serve: the controller actor
acting through the dashboard's REST API, a broken treatment rolled back under load with 0 failed
requests, a killed controller resuming at its stage, the admin API refusing a rerank client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live_app(serve_session, bundle_a, bundle_b, tmp_path_factory):
    from ray import serve
    from rollout_live import LiveApp

    app = LiveApp(
        serve_session.dashboard_url, serve_session.http_url, serve_session.http_port, bundle_a, bundle_b,
        tmp_path_factory.mktemp("rollout-live"), metrics_url=serve_session.metrics_url,
    )  # fmt: skip
    yield app
    serve.delete(app.name)


def test_broken_treatment_is_rolled_back_under_load(live_app) -> None:
    from rollout_live import scenario_live_broken

    rep = scenario_live_broken(live_app)
    assert rep.ok, (rep.checks, rep.measured)


def test_killed_controller_resumes_and_the_admin_api_needs_the_token(live_app) -> None:
    from rollout_live import scenario_live_kill

    rep = scenario_live_kill(live_app)
    assert rep.ok, (rep.checks, rep.measured)
