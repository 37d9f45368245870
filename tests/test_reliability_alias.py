"""bench/reliability.py's `alias` scenario: the skew arithmetic, the object-store setup, and a smoke run
(the whole recipe, quick, with the real train_job.py) on the session's Serve against the loopback S3.

Its own module because the scenario deploys through Serve's config path, which replaces every other
config-deployed app: test_reliability.py's shared app is torn down with that module before this runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.bundles.registry import CACHE_ENV, Registry

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("cotrr_bench_reliability_alias", ROOT / "bench" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


rel = _load_bench()

from kit.load import Rec  # noqa: E402


def rec(t: float, version: str, latency_ms: float = 100.0, status: int = 200) -> Rec:
    return Rec(t=t, latency_ms=latency_ms, status=status, calibrated=True, model_version=version)


def test_version_skew_measures_the_mixed_window_by_completion_time() -> None:
    records = [
        rec(9.0, "old"),  # done at 9.1: before the move, ignored
        rec(10.0, "old"),  # done at 10.1
        rec(10.4, "new"),  # done at 10.5: the first new-id response
        rec(10.5, "old"),  # done at 10.6: old after new
        rec(10.8, "old", latency_ms=400.0),  # done at 11.2: the last old one
        rec(11.0, "new"),
        rec(11.0, "old", status=503),  # not a response from a bundle
        rec(20.0, "old"),  # after the next move (t_to): belongs to the rollback
    ]
    skew = rel.version_skew(records, 10.0, "new", "old", t_to=15.0)
    assert skew == {
        "first_new_s": 0.5,
        "last_old_s": 1.2,
        "window_s": 0.7,
        "old_after_first_new": 2,
        "new_responses": 2,
    }
    clean = rel.version_skew([rec(10.0, "old"), rec(10.5, "new"), rec(11.0, "new")], 10.0, "new", "old")
    assert clean["window_s"] == 0.0 and clean["old_after_first_new"] == 0 and clean["first_new_s"] == 0.6
    never = rel.version_skew([rec(10.0, "old")], 10.0, "new", "old")
    assert never["first_new_s"] is None and never["window_s"] is None


def test_alias_is_a_scenario_and_trains_with_the_served_top_m(tmp_path) -> None:
    assert rel.parse_args(["alias", "--quick"]).scenario == "alias"
    run = rel.AliasRun("u", "app", Registry("s3://b/registry"), "id0", 11, tmp_path, True, rel.Report("alias"))
    cmd = rel.train_command(run)
    assert cmd[cmd.index("--output") + 1] == "s3://b/registry/demo" and cmd[cmd.index("--alias") + 1] == "candidate"
    assert "model.top_m=11" in cmd and "scaling.num_workers=0" in cmd


def test_object_store_points_the_environment_at_a_live_server_and_restores_it(tmp_path) -> None:
    import boto3

    before = dict(os.environ)
    with rel.object_store(False, tmp_path) as none:
        assert none is None and dict(os.environ) == before
    with rel.object_store(True, tmp_path) as root:
        assert root == "s3://cotrr-bench/registry"
        assert os.environ["AWS_ENDPOINT_URL"] != before.get("AWS_ENDPOINT_URL")
        assert os.environ[CACHE_ENV] == str(tmp_path / "bundle-cache")
        buckets = boto3.client("s3").list_buckets()["Buckets"]  # reads the endpoint from the environment
        assert [b["Name"] for b in buckets] == ["cotrr-bench"]
    assert dict(os.environ) == before


@pytest.mark.integration
def test_alias_scenario_smoke(serve_session, s3_bucket, bundle_a, tmp_path) -> None:
    """Serve @production, train into the registry, promote, roll back: the checks pass and the numbers
    the report promises are there."""
    rep = rel.scenario_alias(
        serve_session.http_url + "/relalias",
        serve_session.http_port,
        f"{s3_bucket}/rel-alias/registry",
        bundle_a,
        tmp_path,
        quick=True,
        app="relalias",
        route_prefix="/relalias",
        poll_s=1.0,
    )
    from ray import serve

    serve.delete("relalias")
    d = rep.data
    assert rep.passed, [c for c in rep.checks if not c.ok]
    start = read_meta(bundle_a).bundle_id
    assert d["new_bundle_id"] != start and set(d["model_versions"]) == {start, d["new_bundle_id"]}
    assert d["total"]["failed"] == 0 and d["total"]["requests"] > 0 and d["train"]["wall_s"] > 0
    for move in ("promote", "rollback"):
        assert len(d[move]["replica_on_target_s"]) == 2 and d[move]["converged_s"] is not None
        assert d["skew"][move]["window_s"] is not None and d["skew"][move]["old_after_first_new"] is not None
    assert d["promote"]["to"] == d["new_bundle_id"] and d["rollback"]["to"] == start
