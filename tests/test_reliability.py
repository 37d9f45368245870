"""Reliability of the served application: faults under load, reduced load, limits, load paths.

Integration tests share one app, "rel" at /rel on the session's Serve, deployed from a copy of
serve_config.yaml through Serve's config path (as `serve deploy` does) with: the tiny test bundles
(treatment a, control b -> ScorerControl), two fixed Scorer replicas and one Calibrator (instead
of autoscaling), rollout 100, and health_check_period_s 1 for Scorer and Calibrator so that a
killed replica is replaced within seconds (the shipped default is 10 s; bench/reliability.py
measures with the default). The load generator, response-contract check and replica helpers are
bench/reliability.py's, so the suite runs reduced versions of the documented scenarios:

    python bench/reliability.py autoscale|faults|load [--quick] [--json OUT]

``COTRR_FULL_RELIABILITY=1`` runs the full sizes here too (10,000 requests at concurrency 32, and
the autoscaling ramp on the session's Serve).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pickle
import shutil
import socket
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from _bundles import TOP_M, make_bundle

from cotrr_ray.bundles.bundle import Bundle, BundleError, read_meta, sha256_file
from cotrr_ray.bundles.registry import resolve_uri
from cotrr_ray.core.schema import CandidateRecord
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.serving.api import RequestParser, RerankRequest
from cotrr_ray.serving.errors import RequestError
from cotrr_ray.storage import StorageError

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("COTRR_FULL_RELIABILITY") == "1"
APP, PREFIX = "rel", "/rel"


def _load_bench():
    spec = importlib.util.spec_from_file_location("cotrr_bench_reliability", ROOT / "bench" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


rel = _load_bench()

from kit import cluster as kit_cluster  # noqa: E402
from kit import contract as kit_contract  # noqa: E402
from kit import faults as kit_faults  # noqa: E402
from kit import load as kit_load  # noqa: E402
from kit import machine as kit_machine  # noqa: E402

# ============================================================================ the shared app


@pytest.fixture(scope="module")
def app(serve_session, bundle_a, bundle_b, tmp_path_factory):
    from ray import serve

    cfg = kit_cluster.app_config(
        http_port=serve_session.http_port,
        bundle=str(bundle_a),
        name=APP,
        route_prefix=PREFIX,
        control_bundle=str(bundle_b),
        top_m=TOP_M,
        fixed_replicas={"Router": 1, "Scorer": 2, "Calibrator": 1},
        deployment_overrides={"Scorer": {"health_check_period_s": 1}, "Calibrator": {"health_check_period_s": 1}},
        exposure_log_path=str(tmp_path_factory.mktemp("rel") / "exposure.jsonl"),
    )
    cfg = kit_cluster.set_user_config(cfg, "Router", rollout_percentage=100)
    url = serve_session.http_url + PREFIX
    kit_cluster.deploy(cfg)
    kit_cluster.wait_app(APP, url, timeout_s=240)
    yield {
        "cfg": cfg,
        "url": url,
        "bodies": rel.make_bodies(TOP_M, n_bodies=16, n_candidates=16),
        "version_a": read_meta(bundle_a).bundle_id,
        "version_b": read_meta(bundle_b).bundle_id,
    }
    serve.delete(APP)


def report(name: str, data) -> None:
    print(f"\n[reliability] {name}: {data}")


# ============================================================================ load


@pytest.mark.integration
def test_load_at_concurrency_32_has_zero_errors(app) -> None:
    n = 10_000 if FULL else 500
    gen = kit_contract.LoadGen(app["url"], app["bodies"], concurrency=32, total=n).start()
    gen.join(timeout_s=1800)
    s = kit_load.summarize(gen.records)
    report(
        f"load {n} @ 32 (loadavg {kit_machine.loadavg()})",
        {k: s[k] for k in ("status", "throughput_rps", "latency_ms", "fallbacks")},
    )
    assert s["requests"] == n and s["failed"] == 0, s
    assert s["contract_violations"] == 0, s["problems"]


# ============================================================================ faults


@pytest.mark.integration
def test_scorer_replica_killed_under_load(app) -> None:
    """Serve 2.60 re-routes a request whose replica died to a live one, so with two replicas the
    kill is invisible: zero failed requests, every answer well-formed (any fallback in upstream
    order), and Serve starts a replacement."""
    r = kit_faults.kill_under_load(
        app["url"], APP, app["bodies"], "Scorer", kill_all=False, concurrency=8, replace_timeout_s=60, settle_s=1.0
    )
    t = r["total"]
    report(
        "scorer kill (1 of 2)",
        {
            "replaced_after_s": r["replaced_after_s"],
            "requests": t["requests"],
            "status": t["status"],
            "fallbacks": t["fallbacks"],
            "p99_ms": t["latency_ms"]["p99"],
        },
    )
    assert t["failed"] == 0 and t["contract_violations"] == 0, t
    assert r["replaced_after_s"] is not None and len(r["new_replicas"]) == 1


@pytest.mark.integration
def test_every_scorer_killed_answers_upstream_order_with_fallback(app) -> None:
    r = kit_faults.kill_under_load(
        app["url"], APP, app["bodies"], "Scorer", kill_all=True, concurrency=8, replace_timeout_s=90, settle_s=1.0
    )
    t, d = r["total"], r["during_outage"]
    report(
        "scorer kill (all)",
        {
            "replaced_after_s": r["replaced_after_s"],
            "requests": t["requests"],
            "status": t["status"],
            "fallbacks_during_outage": d["fallbacks"],
        },
    )
    assert t["failed"] == 0, t
    assert t["contract_violations"] == 0, t["problems"]  # every fallback in upstream order, nothing scored
    assert sum(d["fallbacks"].values()) > 0 and set(d["fallbacks"]) <= {"scorer_timeout"} | {
        k for k in d["fallbacks"] if k.startswith("scorer_error:")
    }
    assert r["replaced_after_s"] is not None and len(r["new_replicas"]) == 2


@pytest.mark.integration
def test_calibrator_killed_keeps_the_scorer_order_uncalibrated(app) -> None:
    r = kit_faults.kill_under_load(
        app["url"], APP, app["bodies"], "Calibrator", kill_all=True, concurrency=4, replace_timeout_s=60, settle_s=1.0
    )
    t = r["total"]
    report(
        "calibrator kill",
        {
            "replaced_after_s": r["replaced_after_s"],
            "requests": t["requests"],
            "status": t["status"],
            "uncalibrated": t["uncalibrated"],
            "fallbacks": t["fallbacks"],
        },
    )
    assert t["failed"] == 0 and t["contract_violations"] == 0, t  # uncalibrated answers are model-ordered
    assert t["uncalibrated"] > 0 and not t["fallbacks"]
    assert r["replaced_after_s"] is not None
    out = httpx.post(app["url"] + "/v1/rerank", content=app["bodies"][0].raw, timeout=30).json()
    assert out["calibrated"] and out["fallback"] is None


@pytest.mark.integration
def test_slow_or_failing_shadow_treatment_leaves_control_unaffected(app) -> None:
    url, cfg = app["url"], kit_cluster.set_user_config(app["cfg"], "Router", shadow_mode=True, shadow_timeout_ms=300)
    phases = {}
    try:
        for phase, fault in (
            ("healthy", {"fault": "none"}),
            ("slow", {"fault": "slow", "fault_delay_s": 2.0}),
            ("failing", {"fault": "raise"}),
        ):
            kit_cluster.deploy(kit_cluster.set_user_config(cfg, "Scorer", **fault))
            kit_cluster.wait_config(url, routing={"shadow_mode": True}, scorer=fault)
            before = httpx.get(url + "/v1/stats").json()["shadow"]
            gen = kit_contract.LoadGen(url, app["bodies"], concurrency=4).start()
            time.sleep(2.0)
            s = kit_load.summarize(gen.stop())
            after = httpx.get(url + "/v1/stats").json()["shadow"]
            shadow = {k: after[k] - before[k] for k in ("comparisons", "errors", "timeouts", "dropped", "paused")}
            phases[phase] = {
                **s,
                "shadow": shadow,
                "arms": {r.arm for r in gen.records},
                "versions": {r.model_version for r in gen.records},
            }
    finally:
        kit_cluster.deploy(kit_cluster.set_user_config(app["cfg"], "Scorer", fault="none"))
        kit_cluster.wait_config(url, routing={"shadow_mode": False}, scorer={"fault": "none"})
    report(
        "shadow",
        {
            p: {
                "p50": v["latency_ms"]["p50"],
                "p99": v["latency_ms"]["p99"],
                "requests": v["requests"],
                "shadow": v["shadow"],
            }
            for p, v in phases.items()
        },
    )
    base = phases["healthy"]["latency_ms"]["p50"]
    assert phases["healthy"]["shadow"]["comparisons"] > 0
    for phase in ("slow", "failing"):
        p = phases[phase]
        assert p["failed"] == 0 and p["contract_violations"] == 0 and not p["fallbacks"], p
        assert p["arms"] == {"control"} and p["versions"] == {app["version_b"]}  # the control bundle answered
        # The control path never waits for the shadow (2 s slow / failing): latency stays put.
        assert p["latency_ms"]["p50"] <= max(2 * base, base + 50), (phase, p["latency_ms"], base)
        assert p["latency_ms"]["max"] < 1500, p["latency_ms"]
    assert phases["slow"]["shadow"]["comparisons"] == 0
    assert phases["slow"]["shadow"]["timeouts"] + phases["slow"]["shadow"]["dropped"] > 0
    assert phases["failing"]["shadow"]["errors"] > 0
    assert phases["failing"]["shadow"]["paused"] > 0  # a failing shadow is not called on every request


@pytest.mark.integration
def test_bad_bundle_hot_swaps_are_refused_while_the_previous_keeps_serving(app, bundle_a, test_data, tmp_path) -> None:
    url = app["url"]
    bad = {kind: kit_faults.tamper(bundle_a, tmp_path / kind, kind) for kind in ("corrupt", "missing", "spec")}
    bad["top_m"] = make_bundle(tmp_path / "small", test_data, steps=1, top_m=TOP_M // 2)
    expected = {
        "corrupt": "checksum mismatch for model.pt",
        "missing": "missing file normalizer.json",
        "spec": "not the served one",
        "top_m": f"top_m {TOP_M // 2} < the served top_m {TOP_M}",
    }
    gen = kit_contract.LoadGen(url, app["bodies"], concurrency=4).start()
    errors = {}
    try:
        for kind, path in bad.items():
            kit_cluster.deploy(kit_cluster.set_user_config(app["cfg"], "Scorer", bundle_uri=str(path)))
            model = kit_cluster.wait_config(url, scorer={"bundle_uri": str(path)}, samples=3)
            errors[kind] = model["scorer"]["last_swap_error"] or ""
            assert model["model_version"] == app["version_a"]
    finally:
        kit_cluster.deploy(kit_cluster.set_user_config(app["cfg"], "Scorer", bundle_uri=None))
        kit_cluster.wait_config(url, scorer={"bundle_uri": None})
        s = kit_load.summarize(gen.stop())
    report("hot swap refusals", {"requests": s["requests"], "status": s["status"], "errors": errors})
    for kind, text in expected.items():
        assert text in errors[kind], (kind, errors[kind])
        assert str(bad[kind]) in errors[kind]  # the message names the refused bundle
    assert s["failed"] == 0 and s["contract_violations"] == 0 and not s["fallbacks"], s
    assert {r.model_version for r in gen.records} == {app["version_a"]}  # never a mix, never a fallback


# ============================================================================ limits over HTTP


def _raw_http(port: int, head: bytes, payload_chunks, *, read_timeout_s: float = 10.0) -> tuple[bytes, int]:
    """Send a request head and then chunks until the server answers; returns (response, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.settimeout(0.02)
        sent, resp = 0, b""
        for chunk in payload_chunks:
            try:
                s.sendall(chunk)
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += len(chunk)
            try:
                resp = s.recv(65536)
            except TimeoutError:
                continue
            if resp:
                break
        s.settimeout(read_timeout_s)
        while b"\r\n\r\n" not in resp or not resp.rstrip().endswith(b"}"):
            more = s.recv(65536)
            if not more:
                break
            resp += more
    return resp, sent


@pytest.mark.integration
def test_declared_oversized_body_is_refused_before_it_is_sent(app, serve_session) -> None:
    limit = app["cfg"]["applications"][0]["args"]["max_body_bytes"]
    head = (
        f"POST {PREFIX}/v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * limit}\r\n\r\n"
    ).encode()
    resp, sent = _raw_http(serve_session.http_port, head, [b'{"query":'])  # 9 of 800 MiB declared bytes
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    body = orjson.loads(resp.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "body_too_large" and set(body["error"]) == {"code", "message", "field"}


@pytest.mark.integration
def test_chunked_body_without_content_length_is_cut_off_at_the_limit(app, serve_session) -> None:
    limit = app["cfg"]["applications"][0]["args"]["max_body_bytes"]
    piece = b"[" + b"0," * 32767 + b"0"  # 64 KiB of JSON-ish bytes per chunk
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    head = (
        f"POST {PREFIX}/v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    resp, sent = _raw_http(serve_session.http_port, head, (chunk for _ in range(10 * limit // len(piece))))
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    assert orjson.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    assert sent < 3 * limit, f"the server read {sent} bytes of a {10 * limit}-byte stream before refusing"
    assert httpx.get(app["url"] + "/healthz", timeout=30).status_code == 200


MALFORMED_HTTP = {
    "negative content-length": b"Content-Length: -5\r\n\r\n{}",
    "non-numeric content-length": b"Content-Length: lots\r\n\r\n{}",
    "content-length and chunked": b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bad chunk size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "header line without colon": b"Garbage\r\n\r\n",
}


@pytest.mark.integration
def test_malformed_http_framing_is_a_400_from_the_proxy_never_a_5xx(app, serve_session) -> None:
    """Broken HTTP framing never reaches the app: Serve's proxy (uvicorn/h11) answers 400 text/plain
    and closes the connection (outside the app's JSON error contract, which covers parsed requests)."""
    for name, rest in MALFORMED_HTTP.items():
        head = f"POST {PREFIX}/v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
        with socket.create_connection(("127.0.0.1", serve_session.http_port), timeout=10) as s:
            s.sendall(head + rest)
            resp = s.recv(4096)
        assert resp.startswith(b"HTTP/1.1 400 "), (name, resp[:200])
    big_id = {"x-request-id": "r" * 5000, "content-type": "application/json"}
    r = httpx.post(app["url"] + "/v1/rerank", content=app["bodies"][0].raw, headers=big_id, timeout=30)
    assert r.status_code == 200 and r.json()["request_id"] == "r" * 5000  # echoed, not a failure
    assert httpx.get(app["url"] + "/healthz", timeout=30).status_code == 200


# ============================================================================ limits without Ray


def test_candidate_count_is_enforced_before_per_candidate_validation() -> None:
    parser = RequestParser(IMAGE_SEARCH_SPEC, max_top_m=TOP_M, max_candidates=10)
    cands = [{"id": f"c{i}", "upstream_score": 0.0} for i in range(11)]
    cands[5]["id"] = 7  # malformed, but the list is already over the limit
    with pytest.raises(RequestError) as info:
        parser.parse(orjson.dumps({"query": {"id": "q"}, "candidates": cands}), default_top_m=TOP_M)
    assert info.value.code == "too_many_candidates"


def test_requests_cannot_name_a_bundle_or_any_path() -> None:
    """Bundles come only from the operator's config (AppArgs.bundle_uri / control_bundle_uri, the
    Scorer's user_config bundle_uri); no request field reaches a loader, unknown keys are refused."""
    fields = set(RerankRequest.model_fields) | set(CandidateRecord.model_fields)
    assert fields == {"query", "unit_id", "candidates", "top_m", "top_n", "id", "upstream_score", "features", "label"}
    parser = RequestParser(IMAGE_SEARCH_SPEC, max_top_m=TOP_M, max_candidates=10)
    for extra in ({"bundle_uri": "/etc"}, {"model": "x"}, {"query": {"id": "q", "bundle": "/tmp"}}):
        body = {"query": {"id": "q"}, "candidates": [{"id": "a", "upstream_score": 1.0}], **extra}
        with pytest.raises(RequestError) as info:
            parser.parse(orjson.dumps(body), default_top_m=TOP_M)
        assert info.value.status == 422
    for uri in ("http://h/x", "https://h/x", "hdfs://h/x", "ftp://h/x"):  # s3:// and gs:// are registries
        with pytest.raises(StorageError, match="unsupported storage URI"):
            resolve_uri(uri, "/base")


PACKAGE = ROOT / "cotrr_ray"
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}


def _load_path_problems(path: Path) -> list[str]:
    """Pickle-family imports, unsafe YAML, eval/exec, np.load(allow_pickle=True), and torch.load
    without weights_only=True, found on the AST (docstrings that say "no pickle" do not count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if any(n.split(".")[0] in UNPICKLERS for n in names):
                out.append(f"{where}: imports {names}")
        elif isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if fn.endswith("torch.load"):
                if kw.get("weights_only") != "True":
                    out.append(f"{where}: {fn} without weights_only=True")
            elif fn in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                out.append(f"{where}: {fn}(...)")
            elif fn.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") not in (None, "False"):
                out.append(f"{where}: {fn}(allow_pickle=...)")
    return out


def test_no_pickle_on_any_load_path(tmp_path) -> None:
    """The package never unpickles: no pickle-family import, no unsafe YAML, no eval/exec, and every
    torch.load passes weights_only=True (on the AST: docstrings saying "no pickle" do not count)."""
    files = sorted(PACKAGE.rglob("*.py")) + [ROOT / "train_job.py"]
    problems = [p for f in files for p in _load_path_problems(f)]
    assert not problems, "\n".join(problems)
    torch_loads = {f.name for f in files if "torch.load(" in f.read_text()}
    assert "bundle.py" in torch_loads  # the serving load path is among those checked (train.py: checkpoints)
    probe = tmp_path / "probe.py"  # the checker finds what it must find
    probe.write_text("import pickle\nx = torch.load(f)\ny = torch.load(f, weights_only=False)\nyaml.load(s)\n")
    assert len(_load_path_problems(probe)) == 4


def test_a_pickled_payload_in_model_pt_is_refused_not_executed(bundle_a, tmp_path) -> None:
    """Even with the checksum made to match (a malicious bundle, not a corrupt one), torch.load's
    weights_only unpickler refuses the payload and Bundle.load reports it as an invalid bundle."""
    marker = tmp_path / "executed"
    evil = tmp_path / "evil"
    shutil.copytree(bundle_a, evil)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (evil / "model.pt").write_bytes(pickle.dumps({"weights": Payload()}))
    manifest = orjson.loads((evil / "manifest.json").read_bytes())
    manifest["files"]["model.pt"] = sha256_file(evil / "model.pt")
    (evil / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(BundleError, match="invalid bundle"):
        Bundle.load(evil)
    assert not marker.exists()
    pickle.loads((evil / "model.pt").read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()


# ============================================================================ autoscaling (full run only)


@pytest.mark.integration
@pytest.mark.skipif(not FULL, reason="about 2 minutes: COTRR_FULL_RELIABILITY=1 (or bench/reliability.py autoscale)")
def test_autoscaling_up_to_max_and_back_down_without_failures(serve_session, bundle_a) -> None:
    name, prefix = "rel-as", "/rel-as"
    cfg = rel.autoscale_config(serve_session.http_port, str(bundle_a), TOP_M, name=name, route_prefix=prefix)
    cfg = kit_cluster.set_user_config(cfg, "Router", rollout_percentage=100)
    url = serve_session.http_url + prefix
    kit_cluster.deploy(cfg)  # replaces the "rel" app (config deploys are declarative): keep this test last
    try:
        kit_cluster.wait_app(name, url, timeout_s=240)
        rep = rel.scenario_autoscale(url, name, rel.make_bodies(TOP_M, n_bodies=16, n_candidates=16), quick=True)
    finally:
        from ray import serve

        serve.delete(name)
    report("autoscale", {"times_s": rep.data["times_s"], "total": rep.data["total"]["status"]})
    assert rep.passed, [c for c in rep.checks if not c.ok]
