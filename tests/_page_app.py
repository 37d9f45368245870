"""One Serve app with an event log for the experiment page's browser test and the dashboard's
scrape check (session-scoped: deployed once on the session's local Serve, deleted at the end)."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
from _bundles import request_body

PAGE_SALT = "page-ab"
PREFIX = "/pg"


@pytest.fixture(scope="session", name="page_app")
def _page_app(serve_session, bundle_a, tmp_path_factory):
    from ray import serve

    from cotrr_ray.config import AppArgs, RoutingConfig
    from cotrr_ray.serving.app import build_app

    root = tmp_path_factory.mktemp("page-app") / "log"
    args = AppArgs(
        bundle_uri=str(bundle_a),
        fused_calibration=True,  # one deployment fewer on a 2-core box; the page is the Router's
        routing=RoutingConfig(rollout_percentage=50, experiment_salt=PAGE_SALT),
        event_log={"uri": str(root)},
    )
    serve.run(build_app(args), name="page", route_prefix=PREFIX)
    yield root
    serve.delete("page")


def send_traffic(base_url: str, records: list[dict], n: int, tag: str) -> None:
    """n reranks (unit per request) and a click on the first result of every third answer."""
    with httpx.Client(base_url=base_url, timeout=30) as c:
        for i in range(n):
            rec = records[i % len(records)]
            r = c.post("/v1/rerank", content=orjson.dumps(request_body(rec, unit_id=f"{tag}-user-{i}")))
            assert r.status_code == 200, r.text
            top = r.json()
            if i % 3:
                continue
            event = {
                "event_id": f"{tag}-{i}",
                "request_id": top["request_id"],
                "item_id": top["results"][0]["id"],
                "type": "click",
                "timestamp": time.time(),
            }
            assert c.post("/v1/feedback", content=orjson.dumps({"events": [event]})).status_code == 200
