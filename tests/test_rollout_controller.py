"""The rollout controller without Ray: persistence and resume, commands, actuators, the admin API, the CLI."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import duckdb
import orjson
import pytest
from test_rollout import obs_for, plan

from cotrr_ray.experiments import controller as C
from cotrr_ray.experiments.cli import main as cli
from cotrr_ray.experiments.rollout import ControllerState
from cotrr_ray.serving.rollout import AdminAPI

EXP = "exp-1"
CONTRACT_KEYS = {
    "version",
    "experiment_id",
    "state",
    "updated_at",
    "plan",
    "stage",
    "timeline",
    "guardrails",
    "decisions",
}


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Scripted:
    """An observer that answers a healthy window of whatever stage the state is in (or `make(p, s)`)."""

    def __init__(self, make=None):
        self.make = make or (lambda p, s: obs_for(p, s))

    def __call__(self, log_uri, p, s, now=None):
        return self.make(p, s)


class Promoter:
    def __init__(self):
        self.calls = 0

    def promote(self, reason: str) -> str:
        self.calls += 1
        return "bundle-b"


def controller(tmp_path: Path, clock: Clock, act=None, **kw) -> C.Controller:
    p = kw.pop("p", None) or plan()
    return C.Controller(p, str(tmp_path), EXP, act or C.MemoryActuator(), clock=clock,
                        observer=kw.pop("observer", None) or Scripted(), **kw)  # fmt: skip


def ticks(ctl: C.Controller, clock: Clock, n: int, dt: float = 11.0) -> list:
    if ctl.state is None:
        ctl.load()  # at the current time: the first tick then comes one dt later
    out = []
    for _ in range(n):
        clock.t += dt
        out += ctl.tick()
    return out


def records(tmp_path: Path) -> list[dict]:
    return C.Store(str(tmp_path), EXP).records()


def test_ramp_persists_every_decision_and_the_contract_status(tmp_path) -> None:
    clock, act = Clock(), C.MemoryActuator()
    ctl = controller(tmp_path, clock, act)
    ctl.load()
    assert act.config == {"rollout_percentage": 0.0, "shadow_mode": True, "mode": "ab"}
    ds = ticks(ctl, clock, 2)
    assert [d.action for d in ds] == ["advance", "advance"]
    assert act.config == {"rollout_percentage": 5.0, "shadow_mode": False, "mode": "ab"}
    assert [r["seq"] for r in records(tmp_path)] == [1, 2, 3]
    doc = json.loads((tmp_path / "controller" / EXP / "status.json").read_text())
    assert CONTRACT_KEYS <= set(doc) and doc["version"] == 1 and doc["state"] == "running"
    assert doc["stage"] == {"index": 2, "name": "5%", "mode": "ab", "rollout_percentage": 5.0,
                            "entered_at": clock.t}  # fmt: skip
    assert [d["action"] for d in doc["decisions"]] == ["start", "advance", "advance"]
    assert {"seq", "at", "action", "from_stage", "to_stage", "reason", "actor"} <= set(doc["decisions"][-1])
    assert [t["stage"] for t in doc["timeline"]] == ["shadow", "il", "5%"]
    assert {g["name"] for g in doc["guardrails"]} >= {"fallback_rate", "error_rate", "latency_p99_ms"}
    # every decision is also an event-log line (kind=controller), readable with DuckDB
    lines = duckdb.sql(
        f"SELECT seq, action FROM read_json('{tmp_path}/kind=controller/*/*.jsonl') ORDER BY seq"
    ).fetchall()
    assert lines == [(1, "start"), (2, "advance"), (3, "advance")]


def test_a_restarted_controller_resumes_at_the_same_stage_without_duplicates(tmp_path) -> None:
    clock = Clock()
    first = controller(tmp_path, clock)
    ticks(first, clock, 2)
    entered, seq = first.state.stage_entered_at, first.state.seq
    del first  # killed: nothing but the files survives
    act = C.MemoryActuator()  # a fresh Router config (say a redeploy reset it): the resume re-asserts it
    second = controller(tmp_path, clock, act)
    st = second.load()
    assert (st.stage_index, st.stage_entered_at, st.seq) == (2, entered, seq)
    assert act.config["rollout_percentage"] == 5.0
    ticks(second, clock, 1)
    seqs = [r["seq"] for r in records(tmp_path)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == seq + 1
    assert [r["action"] for r in records(tmp_path)].count("start") == 1


def test_two_controllers_cannot_write_the_same_decision(tmp_path) -> None:
    clock = Clock()
    a, b = controller(tmp_path, clock), controller(tmp_path, clock)
    a.load()
    b.load()  # both at seq 1
    clock.t += 11
    assert [d.action for d in a.tick()] == ["advance"]
    assert b.tick() == []  # seq 2 is taken: b reloads from the records instead of duplicating
    assert b.state.seq == a.state.seq == 2 and b.state.stage_index == 1
    assert [r["seq"] for r in records(tmp_path)] == [1, 2]


def test_commands_from_the_cli_are_applied_once_and_removed(tmp_path, capsys) -> None:
    clock = Clock()
    ctl = controller(tmp_path, clock)
    ticks(ctl, clock, 2)
    base = ["--log", str(tmp_path), "--experiment", EXP, "--operator", "ann"]
    assert cli(["resume", *base]) == 2 and "cannot resume" in capsys.readouterr().err
    assert cli(["pause", *base, "--reason", "looking at a dip"]) == 0
    ds = ticks(ctl, clock, 1)
    assert [(d.action, d.actor) for d in ds] == [("pause", "operator:ann")] and "looking at a dip" in ds[0].reason
    assert not list((tmp_path / "controller" / EXP / "commands").iterdir())
    assert ticks(ctl, clock, 2) == []  # paused: no advance
    assert cli(["force", *base, "--stage", "50%"]) == 0
    assert [d.action for d in ticks(ctl, clock, 1)] == ["force"] and ctl.state.stage_index == 3
    assert cli(["force", *base, "--stage", "nope"]) == 2
    assert cli(["status", "--log", str(tmp_path), "--experiment", EXP]) == 0
    out = capsys.readouterr().out
    assert "running at stage 3 '50%'" in out and "force" in out
    assert cli(["status", "--log", str(tmp_path)]) == 0 and EXP in capsys.readouterr().out
    assert cli(["abort", *base]) == 0
    ticks(ctl, clock, 1)
    assert ctl.state.state == "aborted" and ctl.actuator.config["rollout_percentage"] == 0.0


def test_promotion_moves_the_alias_once_even_across_a_restart(tmp_path) -> None:
    clock, prom = Clock(), Promoter()
    winner = Scripted(lambda p, s: obs_for(p, s, diff=0.3 if s.stage_index >= 2 else 0.0))
    ctl = controller(tmp_path, clock, promoter=prom, observer=winner)
    ds = ticks(ctl, clock, 4)
    assert ds[-1].action == "promote" and ctl.state.state == "promoted" and prom.calls == 1
    doc = json.loads((tmp_path / "controller" / EXP / "status.json").read_text())
    assert doc["promoted_bundle"] == "bundle-b" and doc["routing"]["rollout_percentage"] == 0.0
    again = controller(tmp_path, clock, promoter=prom, observer=winner)
    again.load()
    assert prom.calls == 1 and again.state.promoted_bundle == "bundle-b"


class FlakyPromoter(Promoter):
    def __init__(self):
        super().__init__()
        self.fail = True

    def promote(self, reason: str) -> str:
        self.calls += 1
        if self.fail:
            raise ConnectionError("registry down")
        return "bundle-b"


def test_a_failed_promotion_is_retried_at_the_next_ticks(tmp_path) -> None:
    clock, prom = Clock(), FlakyPromoter()
    winner = Scripted(lambda p, s: obs_for(p, s, diff=0.3 if s.stage_index >= 2 else 0.0))
    ctl = controller(tmp_path, clock, promoter=prom, observer=winner)
    ticks(ctl, clock, 4)
    assert ctl.state.state == "promoted" and ctl.state.promoted_bundle is None
    assert "registry down" in ctl.status()["last_error"]
    prom.fail = False
    assert ticks(ctl, clock, 1) == [] and ctl.state.promoted_bundle == "bundle-b"
    ticks(ctl, clock, 1)
    assert prom.calls == 2 and ctl.status()["last_error"] is None  # once failed, once done, then never again


class FailingActuator(C.MemoryActuator):
    def __init__(self):
        super().__init__()
        self.fail = True

    def apply_routing(self, fields, reason):
        if self.fail:
            raise ConnectionError("dashboard down")
        return super().apply_routing(fields, reason)


def test_an_actuator_failure_is_retried_without_a_new_decision(tmp_path) -> None:
    clock, act = Clock(), FailingActuator()
    ctl = controller(tmp_path, clock, act)
    ds = ticks(ctl, clock, 1)
    assert [d.action for d in ds] == ["advance"] and "dashboard down" in ctl.status()["last_error"]
    act.fail = False
    clock.t += 1  # too soon to advance again
    assert ctl.tick() == [] and act.config["mode"] == "interleave" and ctl.status()["last_error"] is None


def test_an_unreadable_log_still_lets_commands_through(tmp_path) -> None:
    clock = Clock()

    def broken(*_):
        raise OSError("log gone")

    ctl = controller(tmp_path, clock, observer=broken)
    ctl.load()
    C.submit_command(str(tmp_path), EXP, C.new_command("pause", actor="operator:bo"))
    assert [d.action for d in ticks(ctl, clock, 1)] == ["pause"]
    assert "log gone" in ctl.status()["last_error"]


def test_status_keeps_the_running_tests_for_a_resume(tmp_path) -> None:
    clock = Clock()
    ctl = controller(tmp_path, clock)
    ticks(ctl, clock, 2)
    clock.t += 1
    ctl.tick()  # a look without a decision: the per-stage tests moved
    looks = ctl.state.tests["harm:clicks_per_query"].looks
    again = controller(tmp_path, clock)
    assert again.load().tests["harm:clicks_per_query"].looks == looks


# ----------------------------------------------------------------------------- the real actuator's protocol


class FakeDashboard(BaseHTTPRequestHandler):
    """GET/PUT /api/serve/applications/ like Ray 2.60's dashboard (the fields the actuator uses)."""

    details: dict = {}
    puts: list = []

    def do_GET(self):  # noqa: N802
        body = json.dumps(self.details).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        FakeDashboard.puts.append((json.loads(self.rfile.read(n)), self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def app_cfg(name: str, rollout: float) -> dict:
    return {"name": name, "route_prefix": f"/{name}", "import_path": "cotrr_ray.serving.app:build_app",
            "args": {"bundle_uri": "/b"}, "deployments": [
                {"name": "Router", "user_config": {"rollout_percentage": rollout, "experiment_salt": "s"}},
                {"name": "Scorer", "num_replicas": 2}]}  # fmt: skip


@pytest.fixture
def dashboard():
    FakeDashboard.puts = []
    FakeDashboard.details = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000, "request_timeout_s": None, "keep_alive_timeout_s": 90},
        "applications": {
            "rerank": {"deployed_app_config": app_cfg("rerank", 5.0)},
            "other": {"deployed_app_config": app_cfg("other", 1.0)},
            "py": {"deployed_app_config": None},
        },
    }
    srv = HTTPServer(("127.0.0.1", 0), FakeDashboard)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_rest_actuator_puts_back_every_app_with_only_the_router_changed(dashboard) -> None:
    act = C.ServeRestActuator(dashboard, "rerank", headers={"Authorization": "Bearer raytoken"})
    assert act.routing()["rollout_percentage"] == 5.0
    assert act.apply_routing({"rollout_percentage": 5.0}, "same") is False and FakeDashboard.puts == []
    assert act.apply_routing({"rollout_percentage": 20.0, "mode": "ab"}, "advance") is True
    ((schema, auth),) = FakeDashboard.puts
    assert auth == "Bearer raytoken"
    apps = {a["name"]: a for a in schema["applications"]}
    assert set(apps) == {"rerank", "other"}  # the declarative PUT keeps the other config-deployed app
    assert apps["other"] == app_cfg("other", 1.0)
    want = app_cfg("rerank", 5.0)
    want["deployments"][0]["user_config"] = {"rollout_percentage": 20.0, "experiment_salt": "s", "mode": "ab"}
    assert apps["rerank"] == want and schema["http_options"]["port"] == 8000


def test_rest_actuator_leaves_a_router_of_another_experiment_alone(dashboard) -> None:
    with pytest.raises(RuntimeError, match="runs experiment 's', not 'exp-9'"):
        C.ServeRestActuator(dashboard, "rerank", experiment_salt="exp-9").apply_routing(
            {"rollout_percentage": 50.0}, "x"
        )
    assert FakeDashboard.puts == []
    assert C.ServeRestActuator(dashboard, "rerank", experiment_salt="s").apply_routing({"rollout_percentage": 9.0}, "y")


def test_rest_actuator_refuses_an_app_not_deployed_from_a_config(dashboard) -> None:
    with pytest.raises(RuntimeError, match="not deployed from a config"):
        C.ServeRestActuator(dashboard, "py").apply_routing({"rollout_percentage": 1.0}, "x")
    with pytest.raises(RuntimeError, match="no Serve application 'nope'"):
        C.ServeRestActuator(dashboard, "nope").routing()


# ----------------------------------------------------------------------------- admin API


def started(tmp_path: Path) -> None:
    clock = Clock()
    ticks(controller(tmp_path, clock), clock, 2)


def test_a_rerank_client_cannot_change_the_rollout_and_the_operator_can(tmp_path) -> None:
    started(tmp_path)
    api = AdminAPI(str(tmp_path), token="s3cret-admin")
    body = orjson.dumps({"operator": "ann", "reason": "dip"})
    for auth, status in ((None, 401), ("Basic s3cret-admin", 401), ("Bearer guess", 403), ("Bearer s3cret-admin", 202)):
        got, payload = api.command(EXP, "pause", auth, body)
        assert got == status, (auth, payload)
    assert len(list((tmp_path / "controller" / EXP / "commands").iterdir())) == 1  # only the operator's
    assert api.command(EXP, "resume", "Bearer s3cret-admin", body)[0] == 409  # still running until the tick


def test_admin_api_is_off_without_a_token_and_names_bad_fields(tmp_path, monkeypatch) -> None:
    started(tmp_path)
    monkeypatch.delenv("COTRR_ADMIN_TOKEN", raising=False)
    assert AdminAPI(str(tmp_path)).command(EXP, "pause", "Bearer x", b"{}")[0] == 403
    api = AdminAPI(str(tmp_path), token="t")
    status, payload = api.command(EXP, "pause", "Bearer t", b'{"reason": "no operator"}')
    assert status == 422 and payload["error"]["field"] == "operator"
    assert api.command(EXP, "explode", "Bearer t", b'{"operator": "a"}')[0] == 404
    assert api.command("../x", "pause", "Bearer t", b'{"operator": "a"}')[1]["error"]["field"] == "experiment_id"
    assert api.command("exp-unknown", "pause", "Bearer t", b'{"operator": "a"}')[0] == 404


def test_experiments_listing_shows_stage_and_the_configured_salt(tmp_path) -> None:
    started(tmp_path)
    status, doc = AdminAPI(str(tmp_path), token="t").experiments({"experiment_salt": "other-salt"})
    assert status == 200
    by_id = {e["experiment_id"]: e for e in doc["experiments"]}
    assert by_id[EXP]["stage"]["name"] == "5%" and by_id[EXP]["state"] == "running"
    assert by_id["other-salt"]["configured"] and by_id["other-salt"]["state"] is None


def test_the_state_model_round_trips_through_json(tmp_path) -> None:
    started(tmp_path)
    rec = records(tmp_path)[-1]
    assert ControllerState.model_validate_json(orjson.dumps(rec["state"])).stage_index == 2


# ----------------------------------------------------------------------------- the observations' SQL


def _lines(root: Path, kind: str) -> list[dict]:
    return [orjson.loads(x) for f in sorted(root.glob(f"kind={kind}/*/*.jsonl")) for x in f.read_bytes().splitlines()]


def test_stage_window_matches_a_python_count(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from rollout_sim import T0, World, traffic

    from cotrr_ray.experiments import analysis

    w = World(users=300, queries_per_tick=200, broken_from=T0 + 90, seed=3)
    traffic(w, tmp_path, {"rollout_percentage": 20.0, "shadow_mode": False, "mode": "ab"}, "s", T0, T0 + 60)
    traffic(w, tmp_path, {"rollout_percentage": 50.0, "shadow_mode": False, "mode": "ab"}, "s", T0 + 60, T0 + 120)
    traffic(w, tmp_path, {"rollout_percentage": 50.0, "shadow_mode": False, "mode": "ab"}, "other", T0 + 60, T0 + 120)
    got = analysis.stage_window(str(tmp_path), "s", since=T0 + 30, rollout_percentage=50.0, shadow=False)
    rows = [d for d in _lines(tmp_path, "decision")
            if d["experiment_salt"] == "s" and d["ts"] >= T0 + 30 and d["rollout_percentage"] == 50.0]  # fmt: skip
    arms_of: dict[str, set] = {}
    for d in rows:
        arms_of.setdefault(d["unit_id"], set()).add(d["arm"])
    for arm in ("control", "treatment"):
        mine = [d for d in rows if d["arm"] == arm]
        a = got["arms"][arm]
        assert a["queries"] == len(mine)
        assert a["units"] == len({d["unit_id"] for d in mine if len(arms_of[d["unit_id"]]) == 1})
        assert a["fallbacks"] == sum(d["fallback"] for d in mine)
        assert a["errors"] == sum(bool(d["fallback_reason"] and "_error:" in d["fallback_reason"]) for d in mine)
    assert got["arms"]["treatment"]["errors"] > 0 and got["arms"]["control"]["fallbacks"] == 0
    assert got["units_in_multiple_arms"] == sum(len(a) > 1 for a in arms_of.values()) == 0  # one split: sticky
    clicks = {(f["request_id"], f["item_id"]) for f in _lines(tmp_path, "feedback")}
    ids = {d["request_id"] for d in rows}
    assert sum(got["units"].column("clicks").to_pylist()) == sum(1 for r, _ in clicks if r in ids)


def test_live_log_reads_growing_segments_and_torn_lines(tmp_path) -> None:
    from cotrr_ray.experiments import analysis

    seg = tmp_path / "kind=feedback" / "date=2026-12-03" / "a.jsonl"
    seg.parent.mkdir(parents=True)

    def ev(i: int) -> bytes:
        return orjson.dumps({"kind": "feedback", "event_id": f"e{i}", "request_id": "r", "item_id": "x",
                             "type": "click", "timestamp": 1.0, "received_at": 1.0 + i}) + b"\n"  # fmt: skip

    seg.write_bytes(ev(0) + ev(1))
    live = analysis.LiveLog(str(tmp_path))
    assert live.refresh() == 1 and analysis.feedback_summary(live.con)["events"] == 2
    assert live.refresh() == 0  # nothing new: nothing read
    whole = ev(3)
    seg.write_bytes(ev(0) + ev(1) + ev(2) + whole[:20])  # a writer mid-line
    live.refresh()
    s = analysis.feedback_summary(live.con)
    assert (s["events"], s["unreadable_lines"]) == (3, 1)
    seg.write_bytes(ev(0) + ev(1) + ev(2) + whole)
    (seg.parent / "b.jsonl").write_bytes(ev(4))
    assert live.refresh() == 2
    s = analysis.feedback_summary(live.con)
    assert (s["events"], s["unreadable_lines"]) == (5, 0)
    assert s == analysis.feedback_summary(str(tmp_path))  # the same as a full read


# ----------------------------------------------------------------------------- promotion through the registry


def test_registry_promoter_moves_production_to_candidate_once(tmp_path, bundle_a, bundle_b) -> None:
    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.bundles.registry import Registry
    from cotrr_ray.serving.rollout import RegistryPromoter

    reg = Registry(str(tmp_path / "registry"))
    reg.publish(bundle_a, "demo")
    reg.publish(bundle_b, "demo")
    a, b = read_meta(bundle_a).bundle_id, read_meta(bundle_b).bundle_id
    reg.set_alias("demo", "production", a)
    reg.set_alias("demo", "candidate", b)
    prom = RegistryPromoter(str(tmp_path / "registry"), "demo")
    assert prom.promote("rollout exp-1: success") == b
    assert reg.resolve("demo", "production") == b and reg.head("demo", "production").reason.startswith("rollout exp-1")
    moves = len(reg.history("demo", "production"))
    assert prom.promote("again (a resumed controller)") == b and len(reg.history("demo", "production")) == moves
    reg.set_alias("demo", "production", a, reason="a person rolled back")
    reg.set_alias("demo", "candidate", a)
    assert prom.promote("x") == a  # follows the candidate, whatever it names now


def test_registry_promoter_refuses_a_concurrent_move(tmp_path, bundle_a, bundle_b, monkeypatch) -> None:
    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.bundles.registry import AliasConflict, Registry
    from cotrr_ray.serving.rollout import RegistryPromoter

    reg = Registry(str(tmp_path / "registry"))
    for b in (bundle_a, bundle_b):
        reg.publish(b, "demo")
    a, b = read_meta(bundle_a).bundle_id, read_meta(bundle_b).bundle_id
    reg.set_alias("demo", "production", a)
    reg.set_alias("demo", "candidate", b)
    prom = RegistryPromoter(str(tmp_path / "registry"), "demo")
    real_head = prom.registry.head

    def head_then_a_person_moves_it(name, alias):  # read by the promoter, then moved by someone else
        h = real_head(name, alias)
        if alias == "production":
            Registry(str(tmp_path / "registry")).set_alias("demo", "production", b, reason="a person")
        return h

    monkeypatch.setattr(prom.registry, "head", head_then_a_person_moves_it)
    with pytest.raises(AliasConflict):
        prom.promote("rollout")
