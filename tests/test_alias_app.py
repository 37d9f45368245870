"""Serving `@production` from a registry on the loopback S3 server, on the session's real Serve:
the replicas follow a moved alias live, calibrate with the new id's calibrator, and roll back."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
from _bundles import request_body

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.bundles.registry import Registry
from cotrr_ray.config import AppArgs, RoutingConfig, ScorerConfig

pytestmark = pytest.mark.integration

POLL_S = 0.5


@pytest.fixture(scope="module")
def s3_app(serve_session, s3_bucket, bundle_a, bundle_b):
    from ray import serve

    from cotrr_ray.serving.app import build_app

    registry = Registry(f"{s3_bucket}/alias-app/registry")
    registry.publish(bundle_a, "demo")
    registry.publish(bundle_b, "demo")
    registry.set_alias("demo", "production", read_meta(bundle_a).bundle_id)
    args = AppArgs(
        bundle_uri=f"{registry.uri}/demo@production",
        routing=RoutingConfig(rollout_percentage=100),
        scorer=ScorerConfig(alias_poll_s=POLL_S),
    )
    serve.run(build_app(args), name="alias", route_prefix="/alias")
    with httpx.Client(base_url=serve_session.http_url, timeout=30) as client:
        yield registry, client
    serve.delete("alias")


def rerank(client: httpx.Client, body) -> dict:
    r = client.post("/alias/v1/rerank", content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_version(client, body, version: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        out = rerank(client, body)
        assert out["fallback"] is None and out["calibrated"], out  # never a partial or missing bundle
        if out["model_version"] == version:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"still not serving {version} after {timeout_s} s")


def test_alias_move_and_rollback_are_followed_live(s3_app, records, bundle_a, bundle_b) -> None:
    registry, client = s3_app
    a, b = read_meta(bundle_a).bundle_id, read_meta(bundle_b).bundle_id
    body = request_body(records[130], encoding="list", unit_id="user-1")
    assert rerank(client, body)["model_version"] == a
    model = client.get("/alias/v1/model").json()
    assert model["scorer"]["source"] == f"{registry.uri}/demo@production"
    assert model["scorer"]["bundle_uri"] == registry.bundle_uri("demo", a)

    registry.set_alias("demo", "production", b, expected=a)
    took = wait_for_version(client, body, b, timeout_s=POLL_S + 15)
    assert took < POLL_S + 15
    for _ in range(5):  # converged: no flip-flop back to the old id
        assert rerank(client, body)["model_version"] == b

    registry.rollback("demo")
    wait_for_version(client, body, a, timeout_s=POLL_S + 15)
    info = client.get("/alias/v1/model").json()["scorer"]
    assert info["swaps"] == {"ok": 2} and info["bundle_id"] == a
