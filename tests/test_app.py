"""The Serve application over HTTP on a real local Serve instance (one per test session).

Two apps share the session's Serve:
- "py" (route /py), built from Python with `build_app`: treatment + control bundles, rollout 50%.
- "cfg" (route /cfg), deployed from a copy of serve_config.yaml with the `serve deploy` CLI through
  the dashboard, the way operators change it: user_config edits are applied live, and the tests
  check the replicas did not restart (replica ids exposed by /v1/stats and /v1/model).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from _bundles import TOP_M, modified, request_body

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.experiments.assignment import assign_arm, decide
from cotrr_ray.serving.timing import parse_server_timing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SALT = "it-salt"


def wait_for(fn, timeout_s: float = 60.0, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


@pytest.fixture(scope="module")
def client(serve_session):
    with httpx.Client(base_url=serve_session.http_url, timeout=30) as c:
        yield c


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, content=content, headers={"content-type": "application/json"})


def unit_in(arm: str, rollout: float, salt: str = SALT) -> str:
    return next(
        f"user-{i}" for i in range(10_000) if assign_arm(f"user-{i}", salt=salt, rollout_percentage=rollout) == arm
    )


# ============================================================================ app built from Python


@pytest.fixture(scope="module")
def py_app(serve_session, bundle_a, bundle_b, tmp_path_factory):
    from ray import serve

    from cotrr_ray.serving.app import build_app

    exposure = tmp_path_factory.mktemp("exposure") / "exposure.jsonl"
    args = AppArgs(
        bundle_uri=str(bundle_a),
        control_bundle_uri=str(bundle_b),
        exposure_log_path=str(exposure),
        routing=RoutingConfig(rollout_percentage=50, experiment_salt=SALT),
    )
    serve.run(build_app(args), name="py", route_prefix="/py")
    yield {"prefix": "/py", "exposure": exposure}
    serve.delete("py")


def test_contract_ordering_and_tail_passthrough(client, py_app, records, bundle_a) -> None:
    body = request_body(records[130], encoding="list", unit_id=unit_in("treatment", 50))
    r = post(client, "/py/v1/rerank", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"request_id", "model_version", "arm", "shadow", "fallback", "calibrated", "results"}
    assert out["request_id"] == r.headers["x-request-id"]
    stages = parse_server_timing(r.headers["server-timing"])  # the Router's stages; model: the Scorer's batch
    assert list(stages) == ["read", "parse", "score", "model", "calibrate", "total"] and stages["model"] > 0
    assert out["arm"] == "treatment" and out["fallback"] is None and out["calibrated"] and out["shadow"] is False
    assert out["model_version"] == read_meta(bundle_a).bundle_id
    res = out["results"]
    n = len(body["candidates"])
    assert [x["rank"] for x in res] == list(range(n))
    head, tail = res[:TOP_M], res[TOP_M:]
    assert sorted(x["index"] for x in head) == list(range(TOP_M)) and all(x["reranked"] for x in head)
    for a, b in zip(head[:-1], head[1:]):
        assert a["score"] > b["score"] or (a["score"] == b["score"] and a["index"] < b["index"])
    assert all(0 <= x["probability"] <= 1 for x in head)
    assert [x["index"] for x in tail] == list(range(TOP_M, n))
    assert all(x["score"] is None and x["probability"] is None and not x["reranked"] for x in tail)
    records_ = wait_for(
        lambda: (
            [json.loads(line) for line in py_app["exposure"].read_text().splitlines()]
            if py_app["exposure"].exists()
            else None
        ),
        10,
        what="exposure log",
    )
    mine = [e for e in records_ if e.get("request_id") == out["request_id"]]
    assert (
        mine
        and mine[0]["arm"] == "treatment"
        and mine[0]["bucket"] == decide(body["unit_id"], body["query"]["id"], salt=SALT, rollout_percentage=50).bucket
    )


def test_control_arm_is_served_by_the_control_bundle(client, py_app, records, bundle_b) -> None:
    out = post(client, "/py/v1/rerank", request_body(records[131], unit_id=unit_in("control", 50))).json()
    assert out["arm"] == "control" and out["model_version"] == read_meta(bundle_b).bundle_id
    assert out["calibrated"] and out["results"][0]["reranked"]


def test_top_m_top_n_and_base64(client, py_app, records) -> None:
    unit = unit_in("treatment", 50)
    small = post(client, "/py/v1/rerank", request_body(records[132], unit_id=unit, top_m=3, top_n=5)).json()
    assert len(small["results"]) == 5
    assert [x["reranked"] for x in small["results"]] == [True, True, True, False, False]
    assert [x["index"] for x in small["results"][3:]] == [3, 4]
    as_list = post(client, "/py/v1/rerank", request_body(records[133], unit_id=unit, encoding="list")).json()
    as_b64 = post(client, "/py/v1/rerank", request_body(records[133], unit_id=unit, encoding="base64")).json()
    assert [(x["id"], x["score"]) for x in as_list["results"]] == [(x["id"], x["score"]) for x in as_b64["results"]]


def _nan_body(body: dict) -> bytes:
    raw = orjson.dumps(body)
    key = b'"upstream_score":' + orjson.dumps(body["candidates"][0]["upstream_score"])
    return raw.replace(key, b'"upstream_score":NaN', 1)


BAD = [
    (
        "wrong dimension",
        lambda b: modified(b, lambda x: x["candidates"][1]["features"].update(visual=[0.0] * 3)),
        422,
        "candidates[1].features.visual",
    ),
    ("NaN token", _nan_body, 422, "candidates[0].upstream_score"),
    (
        "missing group",
        lambda b: modified(b, lambda x: x["candidates"][0]["features"].pop("conflict")),
        422,
        "candidates[0].features.conflict",
    ),
    ("empty list", lambda b: modified(b, lambda x: x.update(candidates=[])), 422, "candidates"),
    (
        "duplicate ids",
        lambda b: modified(b, lambda x: x["candidates"][2].update(id=x["candidates"][1]["id"])),
        422,
        "candidates[2].id",
    ),
    ("top_m too large", lambda b: modified(b, lambda x: x.update(top_m=TOP_M + 1)), 422, "top_m"),
    ("invalid JSON", lambda b: b"{not json", 422, None),
    (
        "too many candidates",
        lambda b: modified(
            b, lambda x: x.update(candidates=[{"id": f"c{i}", "upstream_score": 0.0} for i in range(1001)])
        ),
        413,
        "candidates",
    ),
    ("oversized body", lambda b: b"[" + b"0," * (4_200_000) + b"0]", 413, None),
]


@pytest.mark.parametrize("name,make,status,field", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_json_errors(client, py_app, records, name, make, status, field) -> None:
    r = post(client, "/py/v1/rerank", make(request_body(records[134])))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "field"} and err["field"] == field


def test_unknown_route_is_a_json_404(client, py_app) -> None:
    r = client.get("/py/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_rollout_proportions_and_stickiness(client, py_app, records) -> None:
    # Pure function over many units: the share tracks the rollout percentage.
    units = [f"member-{i}" for i in range(20_000)]
    for pct in (10, 50):
        share = sum(assign_arm(u, salt=SALT, rollout_percentage=pct) == "treatment" for u in units) / len(units)
        assert abs(share - pct / 100) < 0.015
    # Through HTTP: every answer is the router's decision for that unit, and repeats are sticky.
    body = request_body(records[135], top_m=1)
    arms = {}
    for i in range(300):
        unit = f"member-{i}"
        arms[unit] = post(client, "/py/v1/rerank", {**body, "unit_id": unit}).json()["arm"]
        assert arms[unit] == assign_arm(unit, salt=SALT, rollout_percentage=50)
    assert 0.40 < sum(a == "treatment" for a in arms.values()) / len(arms) < 0.60
    for unit in list(arms)[:60]:
        assert post(client, "/py/v1/rerank", {**body, "unit_id": unit}).json()["arm"] == arms[unit]


def test_model_health_stats_and_docs(client, py_app, bundle_a, bundle_b) -> None:
    model = client.get("/py/v1/model").json()
    assert model["model_version"] == read_meta(bundle_a).bundle_id
    assert model["control_model_version"] == read_meta(bundle_b).bundle_id
    assert model["feature_spec"]["candidate"] == {
        "image_embedding": 512,
        "text_embedding": 512,
        "visual": 8,
        "conflict": 5,
    }
    assert model["top_m"] == {"default": TOP_M, "max": TOP_M} and model["relevance_threshold"] == 1.0
    assert model["routing"]["rollout_percentage"] == 50 and model["max_candidates"] == 1000
    before = client.get("/py/v1/stats").json()
    health = client.get("/py/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    after = client.get("/py/v1/stats").json()
    assert after["requests"] == before["requests"]  # health checks are not traffic
    assert after["served"] > 0 and after["by_arm"]["treatment"] > 0 and after["by_arm"]["control"] > 0
    assert after["rejected"].get("invalid_request", 0) >= 1 and after["latency_ms"]["p50"] > 0
    version_a, version_b = read_meta(bundle_a).bundle_id, read_meta(bundle_b).bundle_id
    assert after["by_model"][version_a] > 0 and after["by_model"][version_b] > 0  # treatment and control bundles
    assert sum(after["by_model"].values()) == after["served"] - sum(after["fallbacks"].values())
    seen = after["model_versions"][version_a]  # treatment ids only: the control bundle is not a skew
    assert set(after["model_versions"]) == {version_a} and seen["first_seen"] <= seen["last_seen"] <= time.time()
    assert after["model_versions_recent"] == {version_a: seen["last_seen"]}
    ratio = after["fallback_ratio"]
    assert ratio["window_s"] == 60 and set(ratio["by_arm"]) == {"treatment", "control"}
    assert ratio["served"] > 0 and 0.0 <= ratio["all"] <= 1.0
    assert client.get("/py/docs").status_code == 200
    assert "RerankRequest" in client.get("/py/openapi.json").json()["components"]["schemas"]


def test_metrics_on_the_prometheus_endpoint(serve_session, client, py_app, records, bundle_a) -> None:
    post(client, "/py/v1/rerank", request_body(records[136], unit_id="metrics-unit"))

    def scrape():
        try:
            text = httpx.get(serve_session.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        # Every series this test reads: Ray exports each metric on its own schedule, so one may lag another.
        series = (
            "ray_cotrr_rerank_requests_total",
            "ray_cotrr_rerank_latency_ms",
            "ray_cotrr_rollout_percentage",
            "ray_cotrr_fallback_ratio",
            "ray_cotrr_model_versions_served",
            "ray_cotrr_responses_by_model_total",
        )
        missing = [s for s in series if s not in text]
        if missing:
            last_missing[:] = missing
            return None
        return text

    last_missing: list[str] = []
    # 120 s: in a full-suite run the metrics agent of a busy 2-core box has been seen to take > 60 s.
    try:
        text = wait_for(scrape, 120, 2, "custom metrics on the Prometheus endpoint")
    except AssertionError as e:
        raise AssertionError(f"{e}; series still missing: {last_missing}") from None
    assert 'application="py"' in text and "ray_cotrr_rollout_percentage" in text
    lines = text.splitlines()
    by_model = [x for x in lines if x.startswith("ray_cotrr_responses_by_model_total{") and 'application="py"' in x]
    assert any(f'model_version="{read_meta(bundle_a).bundle_id}"' in x for x in by_model), by_model
    ratios = [x for x in lines if x.startswith("ray_cotrr_fallback_ratio{") and 'application="py"' in x]
    assert ratios and all('arm="' in x and 0.0 <= float(x.rsplit(" ", 1)[1]) <= 1.0 for x in ratios), ratios


# ============================================================================ app deployed from serve_config.yaml


class ConfigDeployer:
    """Deploys a copy of serve_config.yaml with `serve deploy` and waits until it is applied."""

    def __init__(self, session, bundle: Path, path: Path, env: dict[str, str], client: httpx.Client):
        self.session, self.path, self.env, self.client = session, path, env, client
        self.base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        self.base["http_options"].update(host="127.0.0.1", port=session.http_port)
        app = self.base["applications"][0]
        app.update(name="cfg", route_prefix="/cfg")
        app["args"]["bundle_uri"] = str(bundle)

    def deploy(self, routing: dict | None = None, scorer: dict | None = None) -> None:
        config = copy.deepcopy(self.base)
        deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
        deployments["Router"]["user_config"].update(routing or {})
        deployments["Scorer"]["user_config"].update(scorer or {})
        self.path.write_text(yaml.safe_dump(config))
        serve_cli = str(Path(sys.executable).with_name("serve"))
        subprocess.run(
            [serve_cli, "deploy", str(self.path), "--address", self.session.dashboard_url],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        want_routing = deployments["Router"]["user_config"]
        want_scorer = deployments["Scorer"]["user_config"]

        def applied():
            try:
                model = self.client.get("/cfg/v1/model").json()
            except (httpx.HTTPError, ValueError):
                return None
            routing_ok = all(model.get("routing", {}).get(k) == v for k, v in want_routing.items())
            scorer_cfg = (model.get("scorer") or {}).get("config", {})
            return model if routing_ok and all(scorer_cfg.get(k) == v for k, v in want_scorer.items()) else None

        return wait_for(applied, 90, 0.5, f"config {want_routing} / {want_scorer} to be applied")

    def replica_ids(self) -> tuple[str, str]:
        router = self.client.get("/cfg/v1/stats").json()["replica"]["id"]
        scorer = self.client.get("/cfg/v1/model").json()["scorer"]["replica"]["id"]
        return router, scorer


@pytest.fixture(scope="module")
def cfg_app(serve_session, bundle_a, cli_env, client, tmp_path_factory):
    from ray import serve

    path = tmp_path_factory.mktemp("serve_config") / "serve_config.yaml"
    deployer = ConfigDeployer(serve_session, bundle_a, path, cli_env, client)
    deployer.deploy(routing={"rollout_percentage": 0, "shadow_mode": False, "top_m": TOP_M})
    yield deployer
    serve.delete("cfg")


def test_live_user_config_change_without_replica_restart(client, cfg_app, records) -> None:
    body = request_body(records[137])
    cfg_app.deploy(routing={"rollout_percentage": 0, "shadow_mode": False, "top_m": TOP_M})
    ids = cfg_app.replica_ids()
    out = post(client, "/cfg/v1/rerank", body).json()
    assert out["arm"] == "control" and out["model_version"] is None

    cfg_app.deploy(routing={"rollout_percentage": 100, "shadow_mode": True, "top_m": TOP_M})
    assert cfg_app.replica_ids() == ids  # applied by reconfigure(), same replicas
    out = post(client, "/cfg/v1/rerank", body).json()
    assert out["arm"] == "control" and out["shadow"] is True
    assert [x["id"] for x in out["results"]] == [c["id"] for c in body["candidates"]]
    shadow = wait_for(
        lambda: (s := client.get("/cfg/v1/stats").json()["shadow"])["comparisons"] >= 1 and s,
        30,
        what="shadow comparison",
    )
    assert -1 <= shadow["mean_kendall_tau"] <= 1 and 0 <= shadow["mean_overlap_at_10"] <= 1

    cfg_app.deploy(routing={"rollout_percentage": 100, "shadow_mode": False, "top_m": TOP_M, "server_timing": False})
    r = post(client, "/cfg/v1/rerank", body)
    out = r.json()
    assert out["arm"] == "treatment" and out["results"][0]["reranked"] and out["calibrated"]
    assert "server-timing" not in r.headers  # stage times hidden from clients on request
    assert cfg_app.replica_ids() == ids


def test_bundle_hot_swap_through_user_config(client, cfg_app, records, bundle_a, bundle_b, tmp_path) -> None:
    routing = {"rollout_percentage": 100, "shadow_mode": False, "top_m": TOP_M}
    cfg_app.deploy(routing=routing)
    ids = cfg_app.replica_ids()
    cfg_app.deploy(routing=routing, scorer={"bundle_uri": str(bundle_b)})
    version_b = read_meta(bundle_b).bundle_id
    out = post(client, "/cfg/v1/rerank", request_body(records[138])).json()
    assert out["model_version"] == version_b and out["calibrated"]  # calibrator follows the bundle id
    # A bundle that fails to load keeps the previous one serving; the error is reported.
    model = cfg_app.deploy(routing=routing, scorer={"bundle_uri": str(tmp_path / "missing")})
    assert model["model_version"] == version_b and "missing" in model["scorer"]["last_swap_error"]
    assert post(client, "/cfg/v1/rerank", request_body(records[138])).json()["model_version"] == version_b
    cfg_app.deploy(routing=routing, scorer={"bundle_uri": None})
    out = post(client, "/cfg/v1/rerank", request_body(records[138])).json()
    assert out["model_version"] == read_meta(bundle_a).bundle_id
    assert cfg_app.replica_ids() == ids


def test_fallback_when_the_scorer_raises_and_health_fails(client, cfg_app, records) -> None:
    routing = {"rollout_percentage": 100, "shadow_mode": False, "top_m": TOP_M}
    cfg_app.deploy(routing=routing, scorer={"fault": "raise"})
    body = request_body(records[139])
    r = post(client, "/cfg/v1/rerank", body)
    assert r.status_code == 200
    out = r.json()
    assert out["fallback"] == "scorer_error:RuntimeError" and not out["calibrated"]
    assert [x["id"] for x in out["results"]] == [c["id"] for c in body["candidates"]]
    health = client.get("/cfg/healthz")
    assert health.status_code == 503 and health.json()["checks"]["scorer"]["ok"] is False
    assert client.get("/cfg/v1/stats").json()["fallbacks"]["scorer_error:RuntimeError"] >= 1
    # The failure comes back as a value per window, not raised (no per-call traceback, log, RayTaskError).
    from ray import serve

    from cotrr_ray.serving.scorer import synthetic_list

    spec = read_meta(cfg_app.base["applications"][0]["args"]["bundle_uri"]).spec
    handle = serve.get_deployment_handle("Scorer", app_name="cfg").options(method_name="score_many")
    answers = handle.remote([synthetic_list(spec), synthetic_list(spec, seed=1)]).result(timeout_s=30)
    assert [type(a).__name__ for a in answers] == ["RuntimeError"] * 2 and "injected" in str(answers[0])
    cfg_app.deploy(routing=routing, scorer={"fault": "none"})
    assert client.get("/cfg/healthz").status_code == 200


def test_fallback_when_the_scorer_exceeds_the_timeout(client, cfg_app, records) -> None:
    routing = {"rollout_percentage": 100, "shadow_mode": False, "top_m": TOP_M, "timeout_ms": 300}
    cfg_app.deploy(routing=routing, scorer={"fault": "slow", "fault_delay_s": 3.0})
    t0 = time.perf_counter()
    out = post(client, "/cfg/v1/rerank", request_body(records[140])).json()
    assert time.perf_counter() - t0 < 2.0
    assert out["fallback"] == "scorer_timeout" and out["arm"] == "treatment"
    cfg_app.deploy(routing={**routing, "timeout_ms": 1000}, scorer={"fault": "none", "fault_delay_s": 5.0})
