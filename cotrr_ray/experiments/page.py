"""The experiment page: one self-contained HTML document (inline CSS and SVG, no script, nothing
fetched) from the report (`report.experiment_report`) and, when a controller runs the experiment,
its status document (``<event_log.uri>/controller/<experiment_id>/status.json``, the #15 contract).

    status, problem = load_status(log_uri, "exp-1")            # (None, None): no controller
    html = render_page(experiment_report(log_uri, "exp-1"), status, status_problem=problem)

The plots are inline SVG drawn by `experiments.svg`. Every string from data (ids, stage names,
reasons, details) goes through `_e` (html.escape); class names are picked from fixed tables, never
copied from data.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

import orjson

from cotrr_ray.experiments.svg import sequence_svg, timeline_svg
from cotrr_ray.storage import locate, read_bytes

STATUS_VERSION = 1
STATUS_FILE = "status.json"

# Fixed vocabularies -> CSS classes; anything else renders as "unknown", its text still shown (escaped).
_STATE_CLASS = {
    "running": "ok",
    "paused": "warn",
    "promoted": "ok",
    "concluded": "neutral",
    "rolled_back": "bad",
    "aborted": "bad",
}
_GUARD_CLASS = {"ok": "ok", "breached": "bad", "insufficient_data": "neutral"}
_ACTION_CLASS = {"rollback": "bad", "abort": "bad", "hold": "warn", "pause": "warn", "promote": "ok"}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.4em 0}th,td{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
.badge{display:inline-block;padding:.05em .5em;border-radius:.6em;font-weight:600}
.ok{background:#d9f2dd;color:#145a21}.bad{background:#fadcdc;color:#8a1414}.warn{background:#fcefcf;color:#7a5200}
.neutral,.unknown{background:#e8e8e8;color:#333}tr.current td{background:#eef5ff}tr.pending td{color:#888}
.note{color:#555}.missing{border-left:4px solid #bbb;padding:.3em .8em;background:#fafafa}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(v: Any) -> str:
    """Escaped text of a value from data (quotes too: the result may sit in an attribute)."""
    return html.escape("" if v is None else str(v), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if _finite(v) else "–"


def _pct(v: Any) -> str:
    return f"{v:g}%" if _finite(v) else "–"


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if _finite(t) else "–"


def _duration(s: Any) -> str:
    if not _finite(s):
        return "–"
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _badge(text: Any, classes: dict[str, str]) -> str:
    return f'<span class="badge {classes.get(str(text), "unknown")}">{_e(text)}</span>'


def _table(head: list[str], rows: list[str], attrs: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    return f"<table{attrs}><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _row(cells: list[str], numeric: set[int] = frozenset(), cls: str = "") -> str:
    tds = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(cells))
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


# ----------------------------------------------------------------------------- the controller status


def status_location(event_log_uri: str, experiment_id: str):
    """Where the controller persists `experiment_id`'s status (the #15 contract)."""
    return locate(event_log_uri).child("controller", experiment_id, STATUS_FILE)


def load_status(event_log_uri: str, experiment_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(status, problem): (None, None) when no controller wrote one; (None, why) when it cannot be
    used. An id that is not one plain path segment is never looked up, so no id reaches a file
    outside ``controller/``."""
    if experiment_id in ("", ".", "..") or any(c in experiment_id for c in "/\\\0"):
        return None, f"experiment id {experiment_id!r} is not a plain path segment; no controller status looked up"
    loc = status_location(event_log_uri, experiment_id)
    try:
        raw = read_bytes(loc)
    except FileNotFoundError:
        return None, None
    try:
        status = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, f"controller status {loc.uri} is not JSON: {e}"
    if not isinstance(status, dict) or status.get("version") != STATUS_VERSION:
        got = status.get("version") if isinstance(status, dict) else type(status).__name__
        return None, f"controller status {loc.uri} has version {got!r}, this page reads version {STATUS_VERSION}"
    return status, None


# ----------------------------------------------------------------------------- sections


def stage_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The visited stages in order (the status timeline), the current stage when the timeline does
    not already end with it open, then the plan's stages still ahead; each with its plan settings."""
    plan = [s for s in (status.get("plan") or {}).get("stages") or [] if isinstance(s, dict)]
    visited = [r for r in status.get("timeline") or [] if isinstance(r, dict)]
    rows = [dict(r, state="done" if _finite(r.get("left_at")) else "current") for r in visited]
    cur = status.get("stage") if isinstance(status.get("stage"), dict) else None
    if cur and not (rows and rows[-1]["state"] == "current" and rows[-1].get("index") == cur.get("index")):
        rows.append({"stage": cur.get("name"), "index": cur.get("index"), "entered_at": cur.get("entered_at")})
        rows[-1].update(left_at=None, reason=None, state="current")
    at = cur.get("index") if cur and isinstance(cur.get("index"), int) else -1
    rows += [{"stage": s.get("name"), "index": i, "state": "pending"} for i, s in enumerate(plan) if i > at]
    for r in rows:
        i = r.get("index")
        spec = plan[i] if isinstance(i, int) and 0 <= i < len(plan) else {}
        for key in ("mode", "rollout_percentage", "min_duration_s", "min_units"):
            r.setdefault(key, spec.get(key))
    return rows


def _header(report: dict[str, Any], status: dict[str, Any] | None, now: float) -> str:
    eid = _e(report["experiment_id"])
    if status is None:
        span = report.get("span") or {}
        modes = ", ".join(str(m) for m in span.get("modes") or []) or "–"
        rollouts = ", ".join(_pct(r) for r in span.get("rollout_percentages") or []) or "–"
        stage = (
            '<strong id="current-stage" data-controller="absent">no controller</strong> '
            f'<span class="note">(the event log shows mode {_e(modes)} at rollout {_e(rollouts)})</span>'
        )
        state = ""
    else:
        cur = status.get("stage") if isinstance(status.get("stage"), dict) else {}
        since = cur.get("entered_at")
        stage = (
            f'<strong id="current-stage" data-index="{_e(cur.get("index"))}">{_e(cur.get("name", "–"))}</strong> '
            f'<span class="note">({_e(cur.get("mode"))}, rollout {_e(_pct(cur.get("rollout_percentage")))}, '
            f"since {_e(_when(since))}" + (f", {_duration(now - since)}" if _finite(since) else "") + ")</span>"
        )
        state = f' · state <span id="controller-state">{_badge(status.get("state"), _STATE_CLASS)}</span>'
    return (
        f'<header><h1>Experiment <code id="experiment-id">{eid}</code></h1>'
        f"<p>stage {stage}{state}</p>"
        f'<p class="note">{_e(report["span"].get("decisions"))} decisions from {_e(_when(report["span"].get("first_ts")))}'
        f" to {_e(_when(report['span'].get('last_ts')))} · page generated {_e(_when(now))}</p></header>"
    )


def _no_controller(problem: str | None, eid: str) -> str:
    why = _e(problem) if problem else f"no controller status at controller/{_e(eid)}/status.json beside the event log"
    return f'<p class="missing" data-controller="absent">No controller: {why}.</p>'


def _stages(status: dict[str, Any] | None, problem: str | None, eid: str, now: float) -> str:
    body = _no_controller(problem, eid)
    if status is not None:
        rows = stage_rows(status)
        plan = status.get("plan") or {}
        head = [
            "#",
            "stage",
            "mode",
            "rollout",
            "min duration",
            "min units",
            "entered",
            "left",
            "time in stage",
            "why it left",
        ]
        trs = []
        for r in rows:
            entered, left = r.get("entered_at"), r.get("left_at")
            spent = (left if _finite(left) else now) - entered if _finite(entered) else None
            cells = [_e(r.get("index")), _e(r.get("stage")), _e(r.get("mode")), _e(_pct(r.get("rollout_percentage")))]
            cells += [_e(_duration(r.get("min_duration_s"))), _e(r.get("min_units")), _e(_when(entered))]
            cells += [_e(_when(left)), _e(_duration(spent)), _e(r.get("reason"))]
            trs.append(_row(cells, {0, 5}, r["state"]))
        body = (
            f'<p class="note">plan <code>{_e(plan.get("name"))}</code>, maximum duration '
            f"{_e(_duration(plan.get('max_duration_s')))}; status updated {_e(_when(status.get('updated_at')))}</p>"
            + timeline_svg([r for r in rows if r["state"] != "pending"], now)
            + _table(head, trs, ' id="stage-table"')
        )
    return f'<section id="stages"><h2>Stage timeline</h2>{body}</section>'


def _guardrails(status: dict[str, Any] | None, problem: str | None, eid: str) -> str:
    body = _no_controller(problem, eid)
    if status is not None:
        guards = [g for g in status.get("guardrails") or [] if isinstance(g, dict)]
        trs = [
            _row(
                [
                    _e(g.get("name")),
                    _badge(g.get("status"), _GUARD_CLASS),
                    _e(_num(g.get("value"))),
                    _e(_num(g.get("threshold"))),
                    _e(_num(g.get("p_value"), ".3g")),
                    _e(g.get("detail")),
                ],
                {2, 3, 4},
            )
            for g in guards
        ]
        breached = sum(g.get("status") == "breached" for g in guards)
        body = f'<p id="guardrail-summary" data-breached="{breached}">{breached} of {len(guards)} breached</p>'
        body += _table(["guardrail", "status", "value", "threshold", "p-value", "detail"], trs, ' id="guardrail-table"')
    return f'<section id="guardrails"><h2>Guardrails</h2>{body}</section>'


def _srm(report: dict[str, Any]) -> str:
    srm = report.get("srm") or {}
    if "skipped" in srm or "observed" not in srm:
        text = f"skipped: {srm.get('skipped', 'no SRM result')}"
        return (
            f'<section id="srm"><h2>Sample ratio mismatch</h2><p id="srm-status" data-status="skipped">'
            f"{_badge('skipped', {'skipped': 'neutral'})} {_e(text)}</p></section>"
        )
    flagged = bool(srm.get("flagged"))
    word = "flagged" if flagged else "ok"
    why = []
    if srm.get("mismatch"):
        why.append(f"p = {_num(srm.get('p_value'), '.3g')} < alpha {_num(srm.get('alpha'), 'g')}")
    if srm.get("units_in_multiple_arms"):
        why.append(f"{srm['units_in_multiple_arms']} units seen in more than one arm")
    detail = "; ".join(why) or f"p = {_num(srm.get('p_value'), '.3g')} (alarm below {_num(srm.get('alpha'), 'g')})"
    trs = [
        _row([_e(arm), _e(n), _e(_num((srm.get("expected") or {}).get(arm), ".1f"))], {1, 2})
        for arm, n in (srm.get("observed") or {}).items()
    ]
    return (
        f'<section id="srm"><h2>Sample ratio mismatch</h2><p id="srm-status" data-status="{word}">'
        f"{_badge(word, {'ok': 'ok', 'flagged': 'bad'})} {_e(detail)}; chi² {_e(_num(srm.get('chi2')))}, "
        f"df {_e(srm.get('df'))}</p>" + _table(["arm", "units observed", "units expected"], trs) + "</section>"
    )


ARM_COLUMNS = (
    ("units", "units", "d"),
    ("queries", "queries", "d"),
    ("clicks_per_query", "clicks / query", ".4g"),
    ("ctr_at_k", "CTR@k", ".4g"),
    ("abandonment", "abandonment", ".4g"),
    ("mrr", "MRR", ".4g"),
    ("latency_p50_ms", "p50 ms", ".3g"),
    ("latency_p99_ms", "p99 ms", ".3g"),
    ("fallback_rate", "fallback rate", ".3g"),
)


def _arms(report: dict[str, Any]) -> str:
    trs = [
        _row([_e(a.get("arm"))] + [_e(_num(a.get(k), f)) for k, _, f in ARM_COLUMNS], set(range(1, 10)))
        for a in report.get("arms") or []
    ]
    out = _table(["arm"] + [h for _, h, _ in ARM_COLUMNS], trs, ' id="arm-table"')
    ab = report.get("ab")
    if ab:
        rows = []
        for metric, r in ab.items():
            if "skipped" in r:
                rows.append(_row([_e(metric), "", "", f'<span class="note">{_e(r["skipped"])}</span>', "", ""]))
                continue
            f = r.get("fixed") or {}
            ci = f"[{_num(f.get('ci_low'), '+.4g')}, {_num(f.get('ci_high'), '+.4g')}]"
            cells = [_e(metric), _e(_num(r.get("control"))), _e(_num(r.get("treatment")))]
            rows.append(_row(cells + [_e(_num(f.get("dhat"), "+.4g")), _e(ci), _e(_num(f.get("p_value"), ".3g"))]))
        head = ["metric", "control", "treatment", "difference", "95% CI (Welch)", "p-value"]
        out += "<h3>A/B, fixed horizon (at the end)</h3>" + _table(head, rows, ' id="ab-table"')
    il = report.get("interleaving")
    if il:
        out += (
            f'<h3>Interleaving</h3><p id="interleaving-summary">{_e(il.get("queries"))} queries: treatment wins '
            f"{_e(il.get('wins_treatment'))}, control wins {_e(il.get('wins_control'))}, ties {_e(il.get('ties'))}; "
            f"preference Δ {_e(_num(il.get('delta'), '+.3f'))} (sign test p = {_e(_num(il.get('p_value'), '.3g'))}); "
            f"per unit Δ {_e(_num(il.get('unit_delta'), '+.3f'))} (p = {_e(_num(il.get('unit_p_value'), '.3g'))})</p>"
        )
    return f'<section id="arms"><h2>Per-arm metrics</h2>{out}</section>'


def _sequences(report: dict[str, Any]) -> str:
    tl = report.get("timeline") or {}
    level = 1 - float((report.get("settings") or {}).get("alpha", 0.05))
    parts = []
    for key, label in (("ab", "clicks per query, treatment − control"), ("interleaving", "preference per unit")):
        looks = tl.get(key) or []
        if not looks:
            continue
        last = looks[-1]
        parts.append(
            f'<figure id="sequence-{key}"><figcaption>{_e(label)}: {_e(len(looks))} looks; at the last, '
            f"{_e(_num(last.get('effect'), '+.4g'))} with {level:.0%} confidence sequence "
            f"[{_e(_num(last.get('cs_low'), '+.4g'))}, {_e(_num(last.get('cs_high'), '+.4g'))}], always-valid "
            f"p = {_e(_num(last.get('p_value'), '.3g'))} over {_e(last.get('units'))} units</figcaption>"
            + sequence_svg(looks, label)
            + "</figure>"
        )
    body = "".join(parts) or '<p class="note">No test has enough data yet (two units with variance per arm).</p>'
    return f'<section id="sequences"><h2>Confidence sequences over time</h2>{body}</section>'


def _decisions(status: dict[str, Any] | None, problem: str | None, eid: str) -> str:
    body = _no_controller(problem, eid)
    if status is not None:
        ds = [d for d in status.get("decisions") or [] if isinstance(d, dict)]
        ds.sort(key=lambda d: d.get("seq") if isinstance(d.get("seq"), int) else -1, reverse=True)
        trs = [
            _row(
                [
                    _e(d.get("seq")),
                    _e(_when(d.get("at"))),
                    _badge(d.get("action"), _ACTION_CLASS | {"advance": "neutral", "start": "neutral"}),
                    f"{_e(d.get('from_stage'))} → {_e(d.get('to_stage'))}",
                    _e(d.get("actor")),
                    _e(d.get("reason")),
                ],
                {0},
            )
            for d in ds
        ]
        body = (
            _table(["#", "at", "action", "stage", "by", "reason"], trs, ' id="decision-table"')
            if trs
            else ('<p class="note">No decision yet.</p>')
        )
    return f'<section id="decisions"><h2>Decisions (newest first)</h2>{body}</section>'


def _footer(report: dict[str, Any]) -> str:
    fb = report.get("feedback") or {}
    st = report.get("settings") or {}
    return (
        f'<footer class="note"><p>feedback: {_e(fb.get("events"))} events ({_e(fb.get("duplicates"))} duplicates, '
        f"{_e(fb.get('orphans'))} orphans, {_e(fb.get('unreadable_lines'))} unreadable lines). Settings: alpha "
        f"{_e(st.get('alpha'))}, SRM alpha {_e(st.get('srm_alpha'))}, CTR@{_e(st.get('k'))}, {_e(st.get('looks'))} looks. "
        f"JSON: <code>GET /v1/experiments/{_e(report['experiment_id'])}</code></p></footer>"
    )


def _document(title: str, body: str) -> str:
    # The CSP says what the page promises: nothing loaded from anywhere, no script; inline style only.
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def render_page(
    report: dict[str, Any],
    status: dict[str, Any] | None,
    *,
    status_problem: str | None = None,
    now: float | None = None,
) -> str:
    """The whole page. `status` None: no controller (`status_problem` says why, when it is not absence)."""
    now = time.time() if now is None else now
    eid = str(report["experiment_id"])
    body = (
        _header(report, status, now)
        + _stages(status, status_problem, eid, now)
        + _guardrails(status, status_problem, eid)
        + _srm(report)
        + _arms(report)
        + _sequences(report)
        + _decisions(status, status_problem, eid)
        + _footer(report)
    )
    return _document(f"Experiment {eid}", body)


def render_error(status_code: int, body: dict[str, Any]) -> str:
    """An error page carrying the JSON route's error body (`errors.error_body`: code, message, field)."""
    err = body.get("error") or {}
    text = (
        f'<h1>{_e(status_code)}</h1><p id="error" data-code="{_e(err.get("code"))}">'
        f"<code>{_e(err.get('code'))}</code>: {_e(err.get('message'))}</p>"
    )
    return _document(f"{status_code} {err.get('code', '')}", text)
