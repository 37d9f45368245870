"""The experiment report (cotrr_ray.experiments.report and its CLI) on a real event log written by the
router's logic (RerankService without Ray): simulated clicks on real answers, posted as feedback."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import orjson
import pytest
from _bundles import request_body
from test_events import FakeHttpRequest
from test_serving import Local

from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.experiments import analysis
from cotrr_ray.experiments import stats as S
from cotrr_ray.experiments.cli import main as cli
from cotrr_ray.experiments.eventlog import EventLog
from cotrr_ray.experiments.events import displayed_rows
from cotrr_ray.experiments.interleaving import credit
from cotrr_ray.experiments.report import ReportSettings, experiment_report, format_report
from cotrr_ray.experiments.simulator import ClickModel, simulate_clicks
from cotrr_ray.serving.coalescer import Downstream
from cotrr_ray.serving.observability import ExposureLog
from cotrr_ray.serving.scorer import CalibratorCore, ScorerCore
from cotrr_ray.serving.service import RerankService

UNITS = 160


def run_experiment(bundle_a, bundle_b, records, root, *, mode: str, salt: str) -> list[tuple[dict, np.ndarray]]:
    """UNITS users, one query each, half in the exposed arm; clicks by a position-based model."""
    treat, control = ScorerCore.load(str(bundle_a)), ScorerCore.load(str(bundle_b))
    cal = CalibratorCore()
    cal.add(str(bundle_a))
    cal.add(str(bundle_b))
    down = Downstream(
        score=Local(lambda cl: treat.score([cl])[0]),
        calibrate=Local(cal.transform),
        info=Local(lambda _: {}),
        score_control=Local(lambda cl: control.score([cl])[0]),
        info_control=Local(lambda _: {}),
    )
    args = AppArgs(
        bundle_uri=str(bundle_a),
        routing=RoutingConfig(rollout_percentage=50, experiment_salt=salt, mode=mode),
        event_log={"uri": str(root)},
    )
    log = EventLog(str(root))
    svc = RerankService(read_meta(bundle_a), args, down, exposure=ExposureLog(None), events=log)
    rng = np.random.default_rng(7)
    shown = []
    for i in range(UNITS):
        rec = records[i % len(records)]
        labels = {c["id"]: c["label"] for c in rec["candidates"]}
        resp = asyncio.run(svc.rerank(orjson.dumps(request_body(rec, unit_id=f"{salt}-u{i}")), f"{salt}-r{i}"))
        clicked = simulate_clicks(np.array([labels[r["id"]] for r in resp["results"]]), rng, ClickModel(eta=0.5))
        events = [
            {
                "event_id": f"{salt}-e{i}-{p}",
                "request_id": resp["request_id"],
                "item_id": resp["results"][p]["id"],
                "type": "click",
                "timestamp": time.time(),
            }
            for p in clicked
        ]
        if events:
            status, _ = asyncio.run(svc.handle_feedback(FakeHttpRequest(orjson.dumps({"events": events}))))
            assert status == 200
        shown.append((resp, clicked))
    log.close()
    return shown


@pytest.fixture(scope="module")
def ab_log(bundle_a, bundle_b, records, tmp_path_factory):
    root = tmp_path_factory.mktemp("ab-events")
    return root, run_experiment(bundle_a, bundle_b, records, root, mode="ab", salt="exp-ab")


@pytest.fixture(scope="module")
def il_log(bundle_a, bundle_b, records, tmp_path_factory):
    root = tmp_path_factory.mktemp("il-events")
    return root, run_experiment(bundle_a, bundle_b, records, root, mode="interleave", salt="exp-il")


def test_ab_report_matches_the_statistics_recomputed_from_the_responses(ab_log) -> None:
    root, shown = ab_log
    report = experiment_report(str(root), "exp-ab", ReportSettings(looks=5))
    # independent: per unit (one query each) clicks straight from what was shown and clicked
    per_arm: dict[str, list[int]] = {"control": [], "treatment": []}
    for resp, clicked in shown:
        per_arm[resp["arm"]].append(len(clicked))
    assert report["srm"]["observed"] == {a: len(v) for a, v in per_arm.items()}
    assert report["srm"]["expected"] == {"control": UNITS / 2, "treatment": UNITS / 2}
    c, t = (S.ratio_summary(np.array(per_arm[a], float), np.ones(len(per_arm[a]))) for a in ("control", "treatment"))
    fixed, expected = report["ab"]["clicks_per_query"]["fixed"], S.fixed_horizon_test(c, t)
    for key in ("dhat", "se", "p_value", "ci_low", "ci_high"):
        assert fixed[key] == pytest.approx(getattr(expected, key), rel=1e-9), key
    looks = report["timeline"]["ab"]
    assert 1 <= len(looks) <= 5 and looks[-1]["units"] == UNITS
    assert looks[-1]["effect"] == pytest.approx(t.mean - c.mean)
    # the confidence sequence only narrows, and the always-valid p-value never rises
    assert all(b["cs_high"] - b["cs_low"] <= a["cs_high"] - a["cs_low"] + 1e-12 for a, b in zip(looks, looks[1:]))
    assert all(b["p_value"] <= a["p_value"] for a, b in zip(looks, looks[1:]))
    assert report["interleaving"] is None and report["feedback"]["orphans"] == 0
    assert "A/B clicks_per_query" in format_report(report)


def test_interleaving_report_credits_clicks_like_team_draft_credit(il_log) -> None:
    root, shown = il_log
    report = experiment_report(str(root), "exp-il", ReportSettings(looks=4))
    con = analysis.connect(str(root))
    teams = {
        r["request_id"]: r["items"]
        for r in con.execute("SELECT request_id, items FROM decisions WHERE mode = 'interleave'")
        .fetchdf()
        .to_dict("records")
    }
    wins = [0, 0, 0]
    for resp, clicked in shown:
        if resp["arm"] != "interleave":
            continue
        items = displayed_rows(teams[resp["request_id"]])
        merged = [it for it in items if it["team"] is not None]
        h_t, h_c = credit(
            [it["team"] for it in merged], [it["competitive"] for it in merged], [p for p in clicked if p < len(merged)]
        )
        wins[0 if h_t > h_c else 1 if h_c > h_t else 2] += 1
    il = report["interleaving"]
    assert [il["wins_treatment"], il["wins_control"], il["ties"]] == wins and sum(wins) == il["queries"] > 0
    assert report["srm"]["expected"] == {"control": UNITS / 2, "interleave": UNITS / 2}
    assert report["ab"] is None  # interleaving has no treatment arm to compare in A/B
    assert report["timeline"]["interleaving"], "the per-unit preference must have been tested"


def test_report_cli_writes_json_and_plots_and_fails_clearly(il_log, tmp_path, capsys) -> None:
    root, _ = il_log
    code = cli(
        [
            "report",
            "--log",
            str(root),
            "--experiment",
            "exp-il",
            "--json",
            str(tmp_path / "r.json"),
            "--png-dir",
            str(tmp_path / "png"),
            "--looks",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "interleaving:" in out and "SRM:" in out
    assert json.loads((tmp_path / "r.json").read_text())["experiment_id"] == "exp-il"
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["exp-il-interleaving.png", "exp-il-srm.png"]
    assert cli(["report", "--log", str(root), "--experiment", "nope"]) == 2
    assert "no decision of experiment 'nope'" in capsys.readouterr().err
    assert cli(["report", "--log", str(root), "--experiment", "exp-il", "--set", "alpha=2"]) == 2
