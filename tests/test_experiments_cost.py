"""Smoke run of bench/experiments_cost.py (issue #14: the serving cost of the event log + interleaving).

One `--quick` run at the smallest size on the tiny test bundle: OFF then ON, each on its own fresh
local Ray + Serve (child processes), one level. No timed assertions: shapes, that ON really logs
every decision interleaved and OFF logs nothing, zero errors, the JSON written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import experiments_cost  # noqa: E402


def test_configs_differ_only_in_event_log_and_mode(bundle_a, tmp_path) -> None:
    cfgs = {
        n: experiments_cost.serve_config(
            n, ROOT / "serve_config.yaml", http_port=8123, bundle_uri=str(bundle_a), event_dir=tmp_path / "ev"
        )
        for n in experiments_cost.CONFIGS
    }
    off, on = (experiments_cost.config_summary(cfgs[n]) for n in ("OFF", "ON"))
    assert off == {"event_log_uri": None, "mode": "ab", "rollout_percentage": 100, "control_bundle_uri": None}
    assert on == {**off, "event_log_uri": str(tmp_path / "ev"), "mode": "interleave"}
    # nothing else changed: drop the two edits from ON and it is OFF
    app = cfgs["ON"]["applications"][0]
    app["args"]["event_log"]["uri"] = None
    next(d for d in app["deployments"] if d["name"] == "Router")["user_config"]["mode"] = "ab"
    router_off = next(d for d in cfgs["OFF"]["applications"][0]["deployments"] if d["name"] == "Router")
    router_off["user_config"].setdefault("mode", "ab")
    assert cfgs["ON"] == cfgs["OFF"]


@pytest.mark.integration
def test_experiments_cost_quick(bundle_a, tmp_path) -> None:
    out = tmp_path / "cost.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/experiments_cost.py"),
        "--quick",
        "--bundle",
        str(bundle_a),
        "--concurrency",
        "4",
        "--warmup",
        "0.5",
        "--duration",
        "1",
        "--bodies",
        "3",
        "--json",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    off, on = result["runs"]
    assert (off["name"], on["name"]) == ("OFF", "ON")
    assert off["config"]["event_log_uri"] is None and off["config"]["mode"] == "ab"
    assert on["config"]["event_log_uri"] and on["config"]["mode"] == "interleave"
    for run in (off, on):
        (level,) = run["levels"]
        assert level["requests"] > 0 and level["errors"] == 0 and level["fallbacks"] == 0
        assert level["loadavg"] and level["loadavg_end"]
    log = on["event_log"]
    assert log["decisions"] >= on["levels"][0]["requests"]  # warm-up requests are logged too
    assert log["interleave_mode"] == log["decisions"] == log["with_teams"]
    assert "event_log" not in off
    (row,) = result["summary"]
    assert row["encoding"] == "json" and row["concurrency"] == 4 and row["rps_ratio"] > 0 and row["p50_ratio"] > 0
    assert result["client"] in ("wrk", "httpx") and "verdict" in result
    assert "ratio" in proc.stdout
    assert 0 < row["predicted_rps_ratio"] <= 2 and row["router_ms_off"] > 0  # from the in-process Router phase


def test_router_cpu_phase_runs_without_ray(bundle_a, tmp_path) -> None:
    out = tmp_path / "router.json"
    cmd = [sys.executable, str(ROOT / "bench/experiments_cost.py"), "--router-only", "--bundle", str(bundle_a)]
    cmd += ["--router-requests", "20", "--router-repeats", "2", "--bodies", "3", "--encodings", "json"]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["runs"] == [] and result["summary"] == []
    levels = result["router_cpu"]["levels"]
    assert [(lv["encoding"], lv["concurrency"]) for lv in levels] == [("json", 1), ("json", 16)]
    for lv in levels:
        assert all(len(v) == 2 and min(v) > 0 for v in lv["runs_ms"].values())
        assert lv["added_ms"] == pytest.approx(lv["on_ms"] - lv["off_ms"], abs=1e-3)


def test_py_spy_summary_books_stacks() -> None:
    raw = "\n".join(
        [
            "run (asyncio);_rerank (cotrr_ray/serving/service.py);_log_decision (cotrr_ray/serving/service.py) 3",
            "_run (cotrr_ray/experiments/eventlog.py);dumps (x) 2",
            "parse (cotrr_ray/serving/api.py) 4",
            "other (x.py) 1",
            "garbage",
        ]
    )
    s = experiments_cost.summarize_py_spy(raw, encoding="json", concurrency=32)
    assert s["samples"] == 10 and s["encoding"] == "json"
    share = s["share_of_busy"]
    assert share["request parsing"] == 0.4 and share["other"] == 0.1
    assert share["event log: decision record build/queue (service._log_decision)"] == 0.3
    assert share["event log: writer thread (eventlog)"] == 0.2
