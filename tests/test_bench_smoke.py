"""Smoke runs of the benchmarks (bench/serve_bench.py, bench/train_bench.py, bench/peer_app.py) at tiny
settings, so they keep working; plus the router-side coalescing the serving numbers depend on.

No timed assertions: only shapes, counts and that every piece runs. Ray-free tests first; the two
`integration` tests start Ray (the serving CLI end to end in a subprocess, one Ray Train worker).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peer_app  # noqa: E402
import router_cpu_bench  # noqa: E402
import serve_bench  # noqa: E402
import train_bench  # noqa: E402
from kit import bodies as kit_bodies  # noqa: E402
from kit import cluster as kit_cluster  # noqa: E402
from kit import limit as kit_limit  # noqa: E402
from kit import load as kit_load  # noqa: E402
from kit import machine as kit_machine  # noqa: E402
from kit import report as kit_report  # noqa: E402

from cotrr_ray.bundles.bundle import read_meta  # noqa: E402
from cotrr_ray.config import TrainConfig  # noqa: E402
from cotrr_ray.serving.api import RequestParser  # noqa: E402
from cotrr_ray.serving.coalescer import Coalescer  # noqa: E402
from cotrr_ray.serving.timing import parse_server_timing  # noqa: E402

LEVEL_KEYS = {"rps", "p50_ms", "p95_ms", "p99_ms", "errors", "fallbacks", "requests", "duration_s"}


@pytest.fixture(scope="module")
def tiny_bodies() -> dict[str, list[bytes]]:
    return {enc: serve_bench.make_bodies(enc, n_bodies=3, n_candidates=12, top_m=8) for enc in kit_bodies.ENCODINGS}


# ============================================================================ serve_bench, Ray-free


def test_bodies_parse_and_the_limit_loop_runs(bundle_a, tiny_bodies) -> None:
    meta = read_meta(bundle_a)
    parser = RequestParser(meta.spec, max_top_m=meta.top_m, max_candidates=1000)
    for enc, bodies in tiny_bodies.items():
        assert len(set(bodies)) == 3
        parsed = parser.parse(bodies[0], default_top_m=meta.top_m)
        assert len(parsed.ids) == 12 and parsed.window == 8
        assert (b'"image_embedding":"' in bodies[0]) == (enc == "base64")
        lim = kit_limit.run_limit(str(bundle_a), bodies, batch_size=2, duration_s=0.2, top_m=meta.top_m)
        assert lim["requests"] > 0 and lim["rps"] > 0 and lim["batch_size"] == 2
        assert set(lim["stages_ms_per_request"]) == {"parse_features", "model", "calibrate", "order_serialise"}


def test_the_limit_on_two_cores_runs_one_pinned_process_per_core(bundle_a, tiny_bodies) -> None:
    meta = read_meta(bundle_a)
    out = kit_limit.run_limit_processes(
        str(bundle_a), tiny_bodies["base64"], batch_size=2, duration_s=0.2, top_m=meta.top_m, cpus=[0, 1]
    )
    assert out["processes"] == 2 and out["cpus"] == [0, 1] and [p["cpu"] for p in out["by_process"]] == [0, 1]
    assert all(p["requests"] > 0 for p in out["by_process"])
    assert out["rps"] == pytest.approx(sum(p["rps"] for p in out["by_process"]), abs=0.02)


def test_child_processes_inherit_a_registered_label() -> None:
    # uvicorn's workers are spawned with multiprocessing's command line: they must count as the peer
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            labels = kit_machine.labeled_descendants(os.getpid(), {parent.pid: "peer1"})
            below = [pid for pid, label in labels.items() if pid != parent.pid and label == "peer1"]
            if below:
                break
            time.sleep(0.1)
        assert labels[parent.pid] == "peer1" and below, labels
        assert kit_machine.labeled_descendants(os.getpid())[parent.pid] == "other"  # unregistered: its cmdline
    finally:
        parent.kill()
        parent.wait()


def test_the_bench_refuses_to_run_without_wrk_unless_asked(monkeypatch) -> None:
    monkeypatch.setattr(serve_bench.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install -y wrk"):
        serve_bench.client_kind("auto")
    assert serve_bench.client_kind("httpx") == "httpx"


def test_router_cpu_bench_runs_every_phase(tmp_path) -> None:
    out = tmp_path / "router.json"
    result = router_cpu_bench.main(["--number", "1", "--repeat", "2", "--json", str(out)])
    assert set(result["by_encoding"]) == {"json", "base64"} and out.exists()
    for row in result["by_encoding"].values():
        keys = ("parse_reference", "parse", "orjson_loads", "respond", "hop_payload", "service")
        assert all(row[k] > 0 for k in keys), row
        assert row["hop_payload_dtypes"] == ["float32"] and row["hop_payload_bytes"] > 0
    timed = router_cpu_bench.best_ms_interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, 2, 3)
    assert set(timed) == {"a", "b"} and all(v >= 0 for v in timed.values())


def _start_peer(bundle: Path, port: int, tmp_path: Path, workers: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench/peer_app.py"),
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--exposure-log",
            str(tmp_path / "exposure.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


@pytest.mark.parametrize("client,workers", [("httpx", 1), ("wrk", 1), ("wrk", 2)])
def test_peer_and_load_generator(bundle_a, tiny_bodies, tmp_path, client, workers) -> None:
    if client == "wrk" and not serve_bench.shutil.which("wrk"):
        pytest.skip("wrk not installed (apt-get install -y wrk); the httpx client is the fallback")
    port = kit_cluster.free_port()
    peer = _start_peer(bundle_a, port, tmp_path, workers)
    try:
        kit_cluster.wait_healthy(f"http://127.0.0.1:{port}", 180, peer)
        gen = kit_load.LoadGen(tiny_bodies["base64"], kind=client)
        bench = kit_load.Bench(args=None)
        label = "peer" if workers > 1 else "peer1"
        bench.meter.labels[peer.pid] = label  # as serve_bench registers its peers
        row = bench.level(gen, f"http://127.0.0.1:{port}/v1/rerank", 4, warmup_s=0, duration_s=1, server=label)
        assert LEVEL_KEYS <= set(row) and row["requests"] > 0 and row["errors"] == 0 and row["fallbacks"] == 0
        per = row["cpu"]["per_process"]
        assert per.get(label, 0) > 0 and row["cpu"]["server_cores"] == per[label] and row["loadavg"]
        assert "other" not in per or per["other"] < per[label]  # the spawned workers count as the peer
        assert row["client"] == client
        assert row.get("client_over_budget", False) == (row["cpu"]["client_cores"] > bench.max_client_cores)
        if workers > 1:  # uvicorn's supervisor and its workers
            assert len(kit_machine.labeled_descendants(peer.pid)) >= workers
        # the peer is the same contract as the service: a bad body is the same 422
        status, body = kit_cluster.http_post(f"http://127.0.0.1:{port}/v1/rerank", b"{}")
        assert status == 422 and json.loads(body)["error"]["code"] == "invalid_request"
    finally:
        peer.send_signal(signal.SIGTERM)
        peer.wait(timeout=30)


def test_peer_app_in_process(bundle_a, tiny_bodies) -> None:
    from fastapi.testclient import TestClient

    app = peer_app.create_app(str(bundle_a))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        out = client.post("/v1/rerank", content=tiny_bodies["json"][1], headers={"content-type": "application/json"})
        assert out.status_code == 200
        r = out.json()
        assert r["fallback"] is None and r["calibrated"] and len(r["results"]) == 12
        # the same Server-Timing header as the Router's; `score` is an in-process call here
        stages = parse_server_timing(out.headers["server-timing"])
        assert list(stages) == ["read", "parse", "score", "model", "calibrate", "total"]
        assert all(v >= 0 for v in stages.values()) and stages["total"] >= stages["parse"] and stages["model"] > 0
        assert client.get("/v1/stats").json()["served"] == 1
        bad = client.post("/v1/rerank", content=b"{}", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "server-timing" not in bad.headers


def test_report_helpers_and_plot(tmp_path) -> None:
    def row(enc, c, rps, p50):
        return {
            "encoding": enc,
            "concurrency": c,
            "rps": rps,
            "p50_ms": p50,
            "p95_ms": p50,
            "p99_ms": p50,
            "errors": 0,
            "fallbacks": 0,
            "scorer_batch_mean": 2.0,
            "server_cpu_ms_per_request": 1.0,
            "cpu": {"box_cores": 1.0, "server_cores": 0.9, "client_cores": 0.01, "per_process": {}},
            "loadavg": [0.1, 0.1, 0.1],
        }

    levels = [row(e, c, 100.0 * c**0.5, 5.0 * c) for e in kit_bodies.ENCODINGS for c in (1, 4)]
    peer = [row(e, c, 120.0, 4.0 * c) for e in kit_bodies.ENCODINGS for c in (1, 4)]  # the fair peer
    peer1 = [row(e, c, 80.0, 2.0 * c) for e in kit_bodies.ENCODINGS for c in (1, 4)]  # one worker
    limit = {e: {"rps": 250.0, "ms_per_request": 4.0, "batch_size": 16} for e in kit_bodies.ENCODINGS}
    multi = {e: {"rps": 400.0, "by_process": [{"rps": 200.0}, {"rps": 200.0}]} for e in kit_bodies.ENCODINGS}
    peer1[-1]["client_over_budget"] = True
    result = {
        "levels": levels,
        "peer": {"workers": 2, "levels": peer},
        "peer1": {"workers": 1, "levels": peer1},
        "limit": {"by_encoding": limit, "multi_core": {"cores": 2, "by_encoding": multi}},
        "machine": {"logical_cpus": 2, "cpu_model": "test"},
        "settings": {"encodings": list(kit_bodies.ENCODINGS)},
    }
    result["ratios"] = kit_report.ratios(levels, peer, limit, peer1=peer1, limit_multi=multi)
    assert result["ratios"]["by_encoding"]["json"] == {
        "rps_vs_peer": round(200 / 120, 3),
        "rps_vs_limit": 0.8,
        "p50_vs_peer": 1.25,
        "rps_vs_peer_1worker": 2.5,
        "p50_vs_peer_1worker": 2.5,
        "rps_vs_limit_multicore": 0.5,
        "best_concurrency": 4,
        "peer_best_concurrency": 1,
    }
    assert result["ratios"]["rps_vs_peer"] == result["ratios"]["by_encoding"]["json"]["rps_vs_peer"]
    # without the one-worker peer and the multi-core limit, their ratios are absent (None), not invented
    bare = kit_report.ratios(levels, peer, limit)["by_encoding"]["json"]
    assert bare["rps_vs_peer_1worker"] is None and bare["rps_vs_limit_multicore"] is None
    t = kit_report.targets(result)
    assert t["rps_vs_limit>=0.75[json]"] is True and t["base64_p50_c1<=12ms"] is True
    assert "json" in kit_report.fmt_table(levels, "t")
    flagged = kit_report.fmt_table(peer1, "t")
    assert "not comparable" in flagged and "!" in flagged.splitlines()[-2]
    summary = kit_report.fmt_summary(result)
    assert "fair peer (2 workers)" in summary and "peer (1 worker)" in summary and "limit (2 cores)" in summary
    assert "1.667x, p50 1.25x" in summary and "400.0" in summary
    serve_bench.summarize_client(result, [*levels, *peer, *peer1])
    assert result["client"]["over_budget_levels"] == 1 and result["client"]["ok"] is False
    assert result["client"]["max_cores_used"] == 0.01
    kit_report.plot_serve(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").stat().st_size > 1000

    text = "\n".join(
        [
            'ray_cotrr_scorer_lists_total{application="rerank",deployment="Scorer",replica="a"} 40.0',
            'ray_cotrr_scorer_lists_total{application="rerank",deployment="ScorerControl",replica="c"} 99.0',
            'ray_cotrr_scorer_batches_total{application="rerank",deployment="Scorer",replica="a"} 10.0',
            'ray_cotrr_scorer_batches_total{application="rerank",deployment="ScorerControl",replica="c"} 7.0',
            'ray_serve_batches_processed_total{application="rerank",deployment="Scorer",function_name="x"} 12.0',
        ]
    )
    assert kit_cluster.batch_counters(text) == (40.0, 10.0)

    meter = kit_machine.CpuMeter()
    a = meter.snapshot()
    sum(i * i for i in range(200_000))
    d = kit_machine.CpuMeter.delta(a, meter.snapshot(), client_cpu_s=0.0)
    assert {"box_cores", "client_cores", "server_cores", "per_process"} <= set(d)


def test_profile_summary_and_report() -> None:
    # synthetic Server-Timing samples: graph (with calibrate), fused (none), one fallback (parse+total)
    graph = [
        {"client": 9.0 + i, "read": 0.1, "parse": 1.0, "score": 4.0, "model": 1.5, "calibrate": 1.5, "total": 7.0}
        for i in range(3)
    ]
    fallback = {"client": 3.0, "read": 0.1, "parse": 1.0, "total": 1.2}
    g = kit_load.summarize_profile([*graph, fallback], errors=1, fallbacks=1)
    assert (g["requests"], g["errors"], g["fallbacks"]) == (4, 1, 1)
    m = g["median_ms"]
    assert m["client"] == 9.5 and m["total"] == 7.0 and m["score"] == 4.0 and m["hop"] == 2.5
    assert m["calibrate"] == 1.5 and m["outside"] == 2.5  # per request: 2, 3, 4 and 1.8
    assert g["mean_ms"]["rest"] == pytest.approx((0.5 * 3 + 0.2) / 4)
    mean = g["mean_ms"]  # means add up
    assert mean["client"] == pytest.approx(mean["outside"] + mean["total"], abs=1e-3)
    fused = kit_load.summarize_profile([{k: v for k, v in s.items() if k != "calibrate"} for s in graph])
    assert fused["median_ms"]["calibrate"] is None and fused["median_ms"]["rest"] == 2.0
    peer = kit_load.summarize_profile([{**s, "score": 1.6, "client": 4.0, "total": 4.5} for s in graph])
    assert kit_load.summarize_profile([])["median_ms"]["client"] is None

    profile = {"requests": 4, "encoding": "json", "by_encoding": {"json": {"peer": peer, "graph": g, "fused": fused}}}
    table = kit_report.fmt_profile(profile)
    lines = table.splitlines()
    assert lines[1].split()[-4:] == ["peer", "graph", "fused", "graph-peer"]
    score_row = next(line for line in lines if line.strip().startswith("score"))
    assert score_row.split()[-4:] == ["1.600", "4.000", "4.000", "2.400"]
    assert next(line for line in lines if "calibrate" in line).split()[-2] == "-"

    def level(c, rps, per_process, requests, window=2.0):
        return {
            "encoding": "json",
            "concurrency": c,
            "rps": rps,
            "errors": 0,
            "requests": requests,
            "duration_s": window,
            "cpu": {"window_s": window, "per_process": per_process},
        }

    serve_row = level(
        32, 300.0, {"Router": 0.9, "Scorer": 0.4, "client": 0.04, "bench-driver": 0.01, "peer": 0.001}, 600
    )
    peer_row = level(4, 250.0, {"peer": 1.0, "Router": 0.0, "client": 0.03}, 500)
    assert kit_report.cpu_ms_per_request(serve_row) == {"Router": 3.0, "Scorer": 1.333}
    assert kit_report.cpu_ms_per_request(peer_row, "peer") == {"peer": 4.0}
    result = {
        "settings": {"encodings": ["json"]},
        "limit": {"by_encoding": {"json": {"rps": 500.0, "ms_per_request": 2.0, "cpu_cores": 1.0, "batch_size": 16}}},
        "levels": [level(1, 100.0, {"Router": 0.5}, 200), serve_row],
        "peer": {"levels": [peer_row]},
    }
    text = kit_report.fmt_cpu_per_request(result)
    assert "limit" in text and "Router" in text and "4.333" in text and "4.000" in text


def test_bench_serve_configs_validate() -> None:
    from ray.serve.schema import ServeDeploySchema

    for variant in ("default", "fused", "scaleout2", "nocoalesce"):
        cfg = kit_cluster.serve_config_for_bench(
            ROOT / "serve_config.yaml", http_port=1234, bundle_uri="/b", variant=variant
        )
        ServeDeploySchema.model_validate(cfg)
        names = {d["name"] for d in cfg["applications"][0]["deployments"]}
        assert cfg["http_options"]["host"] == "127.0.0.1" and cfg["http_options"]["port"] == 1234
        assert ("Calibrator" in names) == (variant != "fused")
        assert cfg["applications"][0]["args"].get("fused_calibration", False) == (variant == "fused")


def test_cli_arguments() -> None:
    quick = serve_bench.parse_args(["--quick"])
    assert quick.concurrency == "1,16,64" and not quick.fused and not quick.scaleout and not quick.ablation
    assert not quick.profile and serve_bench.parse_args(["--quick", "--profile"]).profile
    full = serve_bench.parse_args([])
    assert full.concurrency == "1,4,16,32,64" and full.fused and full.scaleout and full.mode == "opt"
    assert full.peer_workers == os.cpu_count() and full.peer1 and full.limit_cores == os.cpu_count()
    assert full.max_client_cores == 0.1 and full.client == "auto"
    assert serve_bench.peer_settings(full) == (
        [("peer", full.peer_workers), ("peer1", 1)] if full.peer_workers > 1 else [("peer", 1)]
    )
    one = serve_bench.parse_args(["--peer-workers", "2", "--no-peer1"])
    assert serve_bench.peer_settings(one) == [("peer", 2)]
    assert serve_bench.peer_settings(serve_bench.parse_args(["--no-peer"])) == []
    assert full.profile and full.profile_requests == 300
    t = train_bench.parse_args(["--quick"])
    assert t.epochs == 3 and t.workers == [1]


# ============================================================================ train_bench, Ray-free


def _tiny_train_cfg(test_data: Path) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"path": str(test_data)},
            "model": {"top_m": 8, "d_model": 32, "n_heads": 2, "n_layers": 1, "ffn_mult": 2},
            "optim": {"batch_size": 16, "max_epochs": 2, "amp": "bf16"},
            "scaling": {"num_workers": 1},
        }
    )


def test_train_bench_plain_loop(test_data, tmp_path) -> None:
    from cotrr_ray.training.prepare import prepare_data

    base = _tiny_train_cfg(test_data)
    data = prepare_data(base, test_data)
    result = {"machine": kit_machine.machine_info(), "cpu": {}}
    for amp in ("bf16", "none"):
        cfg = train_bench.bench_cfg(base, epochs=2, amp=amp)
        r = train_bench.run_plain(cfg, data)
        assert [e["epoch"] for e in r["epochs"]] == [0, 1]
        assert r["samples_per_s"] > 0 and r["epoch_wall_s"] >= r["epoch_train_loop_s"] > 0 and r["amp"] == amp
        result["cpu"][f"plain {amp}"] = r
    result["gpu"] = train_bench.gpu_section(base, data, 1) if not train_bench.torch.cuda.is_available() else {}
    if not train_bench.torch.cuda.is_available():
        assert "skipped" in result["gpu"]
    train_bench.plot(result, tmp_path / "train.png")
    assert (tmp_path / "train.png").stat().st_size > 1000


# ============================================================================ Coalescer (Ray-free)


class _Resp:
    """A fake DeploymentResponse: awaitable list of results, with cancel()."""

    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.cancelled = True
        self.task.cancel()


def test_coalescer_merges_concurrent_items_without_a_timer() -> None:
    calls: list[list[int]] = []

    def send_many(items):
        calls.append(list(items))

        async def run():
            await asyncio.sleep(0.01)
            return [x * 10 if x != 3 else ValueError("item 3") for x in items]

        return _Resp(run())

    async def go():
        c = Coalescer(send_many, max_items=4, max_in_flight=1)
        first = await c(0)  # alone: sent at once
        futs = [c(i) for i in range(1, 7)]  # same loop iteration: 4 + 2
        out = await asyncio.gather(*futs, return_exceptions=True)
        return first, out, c.stats()

    first, out, stats = asyncio.run(go())
    assert first == 0 and calls == [[0], [1, 2, 3, 4], [5, 6]]
    assert out[:2] == [10, 20] and isinstance(out[2], ValueError) and out[3:] == [40, 50, 60]
    assert stats["calls"] == 3 and stats["items"] == 7 and stats["in_flight"] == 0


def test_coalescer_errors_timeouts_and_cancellation() -> None:
    from cotrr_ray.serving.coalescer import call_with_timeout

    responses: list[_Resp] = []

    def slow_send(items):
        async def run():
            await asyncio.sleep(5)
            return items

        responses.append(_Resp(run()))
        return responses[-1]

    def failing_send(items):
        async def run():
            raise RuntimeError("down")

        return _Resp(run())

    async def go():
        c = Coalescer(slow_send, max_items=8, max_in_flight=1)
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await call_with_timeout(c, 1, 0.05)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.01)
        # the abandoned call was cancelled downstream and its slot freed
        assert responses[0].cancelled and c.stats()["in_flight"] == 0
        bad = Coalescer(failing_send)
        results = await asyncio.gather(bad(1), bad(2), return_exceptions=True)
        return elapsed, results

    elapsed, results = asyncio.run(go())
    assert elapsed < 1.0
    assert all(isinstance(r, RuntimeError) for r in results)


def test_fused_mode_answers_exactly_like_the_three_deployment_graph(bundle_a, tiny_bodies) -> None:
    """The fused variant the benchmark measures (calibration inside the scorer, no calibrator hop)
    returns the same response as the default graph, byte for byte apart from the request id."""
    from cotrr_ray.config import AppArgs, RoutingConfig
    from cotrr_ray.serving.coalescer import Downstream
    from cotrr_ray.serving.scorer import CalibratorCore, ScorerCore
    from cotrr_ray.serving.service import RerankService

    core = ScorerCore.load(str(bundle_a))
    cal = CalibratorCore()
    cal.add(str(bundle_a))

    def service(fused: bool) -> RerankService:
        async def score(cl):
            return core.score([cl], calibrate=fused)[0]

        async def calibrate(item):
            return cal.transform(item)

        async def info(_):
            return core.info()

        args = AppArgs(bundle_uri=str(bundle_a), routing=RoutingConfig(rollout_percentage=100), fused_calibration=fused)
        return RerankService(read_meta(bundle_a), args, Downstream(score, None if fused else calibrate, info))

    for body in tiny_bodies["json"] + tiny_bodies["base64"]:
        a = asyncio.run(service(False).rerank(body, "rid"))
        b = asyncio.run(service(True).rerank(body, "rid"))
        assert a == b and a["calibrated"] and a["fallback"] is None
    healthy, detail = asyncio.run(service(True).health())
    assert healthy and detail["checks"]["calibrator"]["ok"]


# ============================================================================ integration (start Ray)


@pytest.mark.integration
def test_serve_bench_cli_end_to_end(bundle_a, tmp_path) -> None:
    """The real thing at the smallest size: own local Ray, serve_config.yaml through the config path
    (throughput-optimised env, direct ingress), one level, the overload check, JSON and PNG."""
    out = tmp_path / "serve.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/serve_bench.py"),
        "--bundle",
        str(bundle_a),
        "--concurrency",
        "2",
        "--encodings",
        "base64",
        "--warmup",
        "0",
        "--duration",
        "1",
        "--limit-duration",
        "0.2",
        "--bodies",
        "3",
        "--no-peer",
        "--limit-cores",
        "2",
        "--client",
        "wrk" if serve_bench.shutil.which("wrk") else "httpx",
        "--no-fused",
        "--no-scaleout",
        "--max-foreign",
        "-1",
        "--no-hop-probe",
        "--no-ablation",
        "--profile-requests",
        "20",
        "--json",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (level,) = result["levels"]
    assert LEVEL_KEYS <= set(level) and level["requests"] > 0 and level["errors"] == 0
    assert level["scorer_batch_mean"] is None or level["scorer_batch_mean"] >= 1
    assert result["settings"]["target"].startswith("router replica port")
    assert result["overload"]["status_503"] > 0
    assert (
        result["limit"]["multi_core"]["cores"] == 2
        and result["ratios"]["by_encoding"]["base64"]["rps_vs_limit_multicore"]
    )
    assert result["client"]["kind"] == result["settings"]["client"] and result["client"]["max_cores_used"] is not None
    assert result["peer_workers"] is None  # --no-peer
    assert out.with_suffix(".png").exists()
    # the per-stage profile through the real graph: Server-Timing from the Router, the Scorer's compute
    prof = result["profile"]["graph"]
    assert prof["requests"] == 20 and prof["errors"] == 0 and set(result["profile"]) >= {"graph", "requests"}
    m = prof["median_ms"]
    assert m["model"] > 0 and m["score"] >= m["model"] and m["calibrate"] > 0 and m["client"] >= m["total"] > 0
    assert "per-stage profile" in proc.stdout and "server CPU ms per request" in proc.stdout


@pytest.mark.integration
def test_train_bench_ray_one_worker(serve_session, test_data, tmp_path) -> None:
    from cotrr_ray.training.ingest import open_training_data, parquet_source

    base = _tiny_train_cfg(test_data)
    base = base.model_copy(update={"data": base.data.model_copy(update={"cache_dir": str(tmp_path / "data")})})
    data = open_training_data(base, parquet_source(base, test_data, say=lambda _: None))
    r = train_bench.run_ray(train_bench.bench_cfg(base, epochs=2), data, tmp_path, num_workers=1)
    assert [e["epoch"] for e in r["epochs"]] == [0, 1] and r["world_size"] == 1
    assert r["startup_s"] > 0 and r["samples_per_s"] > 0 and np.isfinite(r["final_train_loss"])


@pytest.mark.integration
def test_ingest_bench_quick(tmp_path) -> None:
    import ingest_bench

    result = ingest_bench.main(["--quick", "--json", str(tmp_path / "ingest.json"), "--workdir", str(tmp_path)])
    assert [r["queries"] for r in result["runs"]] == [60]
    for r in result["runs"]:
        assert r["driver_peak_mb"] > 0 and len(r["train_workers_peak_mb"]) == 2
        assert sum(r["splits"].values()) == r["queries"]
    assert set(result["ratios"]) == {
        "driver_peak_last_over_first",
        "worker_peak_last_over_first",
        "driver_peak_over_disk_at_last",
        "driver_private_last_over_first",
        "worker_private_last_over_first",
    }
    assert (tmp_path / "ingest.png").read_bytes()[:4] == b"\x89PNG"
