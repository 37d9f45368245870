"""The experiment page (cotrr_ray.experiments.page) without Ray: rendered from a report over a real
event log (the router's logic, simulated clicks; test_experiment_report's experiment) and a
controller status that follows the #15 contract field for field; read back with an HTML parser."""

from __future__ import annotations

import asyncio
import copy
import re

import orjson
import pytest
from _controller_status import Page, contract_status, write_status
from _page_app import PAGE_SALT
from test_experiment_report import run_experiment

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.config import AppArgs
from cotrr_ray.experiments.page import load_status, render_error, render_page, stage_rows
from cotrr_ray.experiments.report import ReportSettings, experiment_report
from cotrr_ray.experiments.svg import sequence_svg
from cotrr_ray.serving.coalescer import Downstream
from cotrr_ray.serving.observability import ExposureLog
from cotrr_ray.serving.service import RerankService
from cotrr_ray.storage import locate, write_bytes

SALT = PAGE_SALT
EVIL = '<script>alert("x")</script>&"\''


@pytest.fixture(scope="module")
def page_log(bundle_a, bundle_b, records, tmp_path_factory):
    root = tmp_path_factory.mktemp("page-events")
    run_experiment(bundle_a, bundle_b, records, root, mode="ab", salt=SALT)
    return root


@pytest.fixture(scope="module")
def report(page_log):
    return experiment_report(str(page_log), SALT, ReportSettings(looks=6))


def t0_of(report) -> float:
    return float(report["span"]["first_ts"])


def test_page_with_a_controller_shows_stage_timeline_guardrails_decisions_srm_and_arms(report) -> None:
    t0 = t0_of(report)
    status = contract_status(SALT, t0)
    page = Page(render_page(report, status, now=t0 + 1200.0))
    assert page.text("experiment-id") == SALT
    assert page.text("current-stage") == "5%" and page.attr("current-stage", "data-index") == "2"
    assert page.text("controller-state") == "running"
    # timeline: two stages left (with the reasons they left), the current one, the one still ahead
    rows = page.rows("stage-table")
    assert [(r["cells"][1], r["class"]) for r in rows] == [
        ("shadow", "done"),
        ("interleave", "done"),
        ("5%", "current"),
        ("100%", "pending"),
    ]
    assert rows[0]["cells"][-1] == "min duration and sample reached, guardrails ok"
    assert rows[2]["cells"][8] == "5.0 min"  # in stage from t0 + 900 to now = t0 + 1200
    assert [r["cells"][2] for r in rows] == ["shadow", "interleave", "ab", "ab"]  # from the plan
    assert page.tags["rect"] == 3  # one bar per visited stage
    guards = page.rows("guardrail-table")
    assert [(g["cells"][0], g["cells"][1]) for g in guards] == [
        ("fallback_rate", "ok"),
        ("p99_latency_ms", "ok"),
        ("clicks_per_query", "insufficient_data"),
    ]
    assert page.attr("guardrail-summary", "data-breached") == "0"
    decisions = page.rows("decision-table")
    assert [d["cells"][0] for d in decisions] == ["3", "2", "1"]  # newest first
    assert decisions[0]["cells"][3:] == ["interleave → 5%", "controller", status["decisions"][2]["reason"]]
    assert decisions[2]["cells"][4] == "operator:alice"
    # SRM and the arms come from the report
    srm = report["srm"]
    assert page.attr("srm-status", "data-status") == ("flagged" if srm["flagged"] else "ok")
    arms = {r["cells"][0]: r["cells"] for r in page.rows("arm-table")}
    assert {a["arm"]: str(a["units"]) for a in report["arms"]} == {k: v[1] for k, v in arms.items()}
    assert sum(int(v[1]) for v in arms.values()) == 160
    assert "A/B, fixed horizon" in page.text("arms") and len(page.rows("ab-table")) == 4


def test_the_confidence_sequence_plot_draws_the_report_timeline(report) -> None:
    looks = report["timeline"]["ab"]
    assert len(looks) >= 2
    svg = sequence_svg(looks, "effect")
    line = re.search(r'<polyline points="([^"]+)"', svg).group(1).split()
    band = re.search(r'<polygon points="([^"]+)"', svg).group(1).split()
    assert len(line) == len(looks) and len(band) == 2 * len(looks)
    ys = [float(p.split(",")[1]) for p in line]
    # SVG y grows downwards: a larger effect is drawn higher (smaller y). Coordinates are printed to
    # 0.1 px, so two looks whose effects differ by less than that may share a y (the data is timed).
    span = max(lk["effect"] for lk in looks) - min(lk["effect"] for lk in looks)
    for (a, ya), (b, yb) in zip(zip(looks, ys), zip(looks[1:], ys[1:])):
        if b["effect"] > a["effect"]:
            assert yb <= ya and (yb < ya or b["effect"] - a["effect"] < 0.01 * span)
        elif b["effect"] < a["effect"]:
            assert yb >= ya and (yb > ya or a["effect"] - b["effect"] < 0.01 * span)
    upper = [float(p.split(",")[1]) for p in band[: len(looks)]]
    assert all(u <= y for u, y in zip(upper, ys))  # the band's upper edge is above the effect
    # every drawn point stays inside the plot area (y from 12 to 240 - 36), however wide the early band
    assert all(12 <= float(p.split(",")[1]) <= 204 for p in line + band)
    page = Page(render_page(report, None))
    caption = page.text("sequence-ab")
    assert f"{len(looks)} looks" in caption and f"over {looks[-1]['units']} units" in caption


def test_without_a_controller_the_page_says_so_and_still_shows_the_report(report) -> None:
    html = render_page(report, None)
    page = Page(html)
    assert page.text("current-stage") == "no controller"
    assert page.attr("current-stage", "data-controller") == "absent"
    for section in ("stages", "guardrails", "decisions"):
        assert "No controller: no controller status at controller/page-ab/status.json" in page.text(section)
    assert "stage-table" not in page.by_id and "decision-table" not in page.by_id
    assert "controller-state" not in page.by_id
    assert page.rows("arm-table") and "srm-status" in page.by_id
    problem = "controller status s3://b/x is not JSON: unexpected character"
    assert f"No controller: {problem}." in Page(render_page(report, None, status_problem=problem)).text("stages")


def test_every_string_from_data_is_escaped(report) -> None:
    evil_report = copy.deepcopy(report) | {"experiment_id": EVIL}
    t0 = t0_of(report)
    status = contract_status(EVIL, t0, state=EVIL)
    status["stage"]["name"] = EVIL
    status["plan"]["stages"][3]["name"] = EVIL
    status["guardrails"][0] |= {"name": EVIL, "status": EVIL, "detail": EVIL}
    status["decisions"][0] |= {"reason": EVIL, "actor": EVIL, "action": EVIL}
    status["timeline"][0]["reason"] = EVIL
    html = render_page(evil_report, status, now=t0 + 1200.0)
    assert "<script" not in html and "&lt;script&gt;" in html
    page = Page(html)
    assert page.text("experiment-id") == EVIL and page.text("current-stage") == EVIL  # intact once unescaped
    assert page.text("controller-state") == EVIL
    assert page.rows("guardrail-table")[0]["cells"][:2] == [EVIL, EVIL]
    assert page.rows("decision-table")[-1]["cells"][2] == EVIL
    assert page.rows("decision-table")[-1]["cells"][4:] == [EVIL, EVIL]
    # unknown vocabulary never becomes a class name
    classes = {c for _, a in page.elements for c in (a.get("class") or "").split()}
    allowed = "badge ok bad warn neutral unknown n note missing done current pending sequence timeline clipped"
    assert classes <= set(allowed.split())
    assert page.tags.get("script", 0) == 0
    error = Page(render_error(404, {"error": {"code": "not_found", "message": EVIL, "field": None}}))
    assert error.text("error") == f"not_found: {EVIL}"


def test_the_page_is_self_contained(report) -> None:
    html = render_page(report, contract_status(SALT, t0_of(report)))
    page = Page(html)
    assert not [(t, a) for t, a in page.elements if {"src", "href", "srcset", "action"} & set(a)]
    assert not re.search(r"https?://|url\(|@import", html)
    assert page.tags.get("svg", 0) >= 2 and page.tags.get("link", 0) == 0 and page.tags.get("script", 0) == 0
    assert "default-src 'none'" in html


def test_srm_states_flagged_and_skipped(report) -> None:
    flagged = copy.deepcopy(report)
    flagged["srm"] |= {"flagged": True, "mismatch": True, "p_value": 1e-6}
    page = Page(render_page(flagged, None))
    assert page.attr("srm-status", "data-status") == "flagged" and "p = 1e-06 < alpha 0.001" in page.text("srm-status")
    skipped = copy.deepcopy(report) | {"srm": {"skipped": "the rollout changed during the experiment ([5.0, 20.0])"}}
    page = Page(render_page(skipped, None))
    assert page.attr("srm-status", "data-status") == "skipped"
    assert "the rollout changed during the experiment ([5.0, 20.0])" in page.text("srm-status")


def test_stage_rows_when_the_timeline_ends_with_the_open_current_stage() -> None:
    status = contract_status("x", 1000.0)
    status["timeline"].append({"stage": "5%", "index": 2, "entered_at": 1900.0, "left_at": None, "reason": None})
    rows = stage_rows(status)
    assert [(r["stage"], r["state"]) for r in rows] == [
        ("shadow", "done"),
        ("interleave", "done"),
        ("5%", "current"),
        ("100%", "pending"),
    ]
    ended = contract_status("x", 1000.0, state="promoted")
    ended["stage"] = ended["plan"]["stages"][3] | {"index": 3, "entered_at": 2000.0}
    assert [r["state"] for r in stage_rows(ended)] == ["done", "done", "current"]


def test_load_status_reads_the_contract_path_and_says_why_it_cannot(tmp_path) -> None:
    uri = str(tmp_path / "log")
    assert load_status(uri, SALT) == (None, None)
    status = contract_status(SALT, 1000.0)
    write_status(uri, status)
    assert (tmp_path / "log" / "controller" / SALT / "status.json").is_file()
    assert load_status(uri, SALT) == (status, None)
    write_bytes(locate(uri).child("controller", "bad", "status.json"), b"{not json")
    got, problem = load_status(uri, "bad")
    assert got is None and "is not JSON" in problem
    write_bytes(locate(uri).child("controller", "v2", "status.json"), orjson.dumps({"version": 2}))
    got, problem = load_status(uri, "v2")
    assert got is None and "has version 2, this page reads version 1" in problem
    # an id that would leave controller/ is never looked up, even when the file it names exists
    write_bytes(locate(uri).child("status.json"), orjson.dumps(status))
    for bad in ("..", "a/../..", "a\\b", ""):
        got, problem = load_status(uri, bad)
        assert got is None and "not a plain path segment" in problem, bad


# ----------------------------------------------------------------------------- through the service


def page_service(bundle, log_uri: str | None) -> RerankService:
    args = AppArgs(bundle_uri=str(bundle), event_log={"uri": log_uri})
    events = None
    if log_uri is not None:
        from cotrr_ray.experiments.eventlog import EventLog

        events = EventLog(log_uri)
    down = Downstream(score=None, calibrate=None, info=None)
    return RerankService(read_meta(bundle), args, down, exposure=ExposureLog(None), events=events)


def test_service_serves_the_page_and_the_json_routes_404s(bundle_a, page_log, tmp_path) -> None:
    svc = page_service(bundle_a, str(page_log))
    code, html = asyncio.run(svc.experiment_page(SALT))
    assert code == 200 and Page(html).text("current-stage") == "no controller"
    write_status(str(page_log), contract_status(SALT, 1000.0))
    try:
        code, html = asyncio.run(svc.experiment_page(SALT))
        assert code == 200 and Page(html).text("current-stage") == "5%"
    finally:
        (page_log / "controller" / SALT / "status.json").unlink()
    for service, eid in ((svc, "no-such-experiment"), (page_service(bundle_a, None), SALT), (svc, "x" * 300)):
        json_code, body = asyncio.run(service.experiment(eid))
        code, html = asyncio.run(service.experiment_page(eid))
        err = Page(html)
        assert code == json_code and code in (404, 422)
        assert err.attr("error", "data-code") == body["error"]["code"]
        assert err.text("error") == f"{body['error']['code']}: {body['error']['message']}"
    svc.events.close()


def test_a_wide_early_band_is_cut_at_the_edge_and_says_so() -> None:
    looks = [
        {"ts": 100.0 + i, "units": 10 * (i + 1), "effect": 0.1, "cs_low": 0.1 - w, "cs_high": 0.1 + w, "p_value": 1.0}
        for i, w in enumerate([50.0, 1.0, 0.5, 0.4, 0.3, 0.2])
    ]
    svg = sequence_svg(looks, "effect")
    assert "band cut at the edge" in svg
    band = [float(p.split(",")[1]) for p in re.search(r'<polygon points="([^"]+)"', svg).group(1).split()]
    assert min(band) == 12.0 and max(band) == 204.0  # the first look's band, clamped to the plot
    assert band[2] > 12.0  # the later looks are scaled to be seen, not squashed
    narrow = [lk | {"cs_low": 0.1 - 0.2, "cs_high": 0.1 + 0.2} for lk in looks]
    assert "band cut at the edge" not in sequence_svg(narrow, "effect")
    assert "No look with a finite" in sequence_svg([looks[0] | {"cs_low": None}], "effect")


def test_ci_installs_the_browser_and_then_requires_the_browser_test() -> None:
    """.ci/run is what makes CI run the browser test instead of skipping it."""
    from pathlib import Path

    run = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    install = run[run.index("apt-get install") :].split("\n\n")[0]
    assert all(pkg in install for pkg in ("chromium", "chromium-driver")), install
    assert "export COTRR_REQUIRE_BROWSER=1" in run and run.index("export COTRR_REQUIRE_BROWSER=1") < run.index("pytest")


def test_a_sparse_or_garbled_status_still_renders(report) -> None:
    """Only `version` is checked on load; every other field may be missing or of the wrong shape."""
    minimal = Page(render_page(report, {"version": 1, "experiment_id": SALT}))
    assert minimal.text("current-stage") == "–" and minimal.rows("stage-table") == []
    assert minimal.text("guardrail-summary") == "0 of 0 breached" and "No decision yet." in minimal.text("decisions")
    garbled = {"version": 1, "stage": "5%", "timeline": ["x", None], "guardrails": [None, 3], "decisions": ["y"]}
    garbled["plan"] = {"stages": [None, {"name": "only"}]}
    page = Page(render_page(report, garbled))
    assert [r["cells"][1] for r in page.rows("stage-table")] == ["only"]  # pending: no current stage known
