"""cluster/grafana-cotrr.json names only series the app exports, with labels those series carry.

What is exported is read from the code, never listed by hand: every `Counter` / `Gauge` /
`Histogram` defined with a literal name in the package (ServeMetrics and the Scorer's counters in
serving/deployments.py, and wherever the rollout controller defines its series), and in the Ray
Serve modules whose series the dashboard uses (the replica's and @serve.batch's metrics). Ray
exports a metric `x` as `ray_x` (counters `ray_x_total`, histograms `ray_x_bucket|_sum|_count`), as
bench/kit/cluster.py scrapes them; metrics from `ray.serve.metrics` also carry Serve's
`deployment`, `replica` and `application` tags. test_experiment_page_browser.py checks that rule on
a real scrape.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana-cotrr.json"
PACKAGE = REPO / "cotrr_ray"
# The Ray Serve modules whose series the dashboard uses: per-replica latency, @serve.batch sizes.
RAY_SERVE_MODULES = ("_private/replica.py", "batching.py")
SERVE_TAGS = frozenset({"deployment", "replica", "application"})  # ray.serve.metrics adds them in a replica
# The rollout controller's series (issue #15; serving/rollout_actor.py exports them, not a replica).
EXPERIMENT_SERIES = {
    "ray_cotrr_rollout_stage": {"experiment"},
    "ray_cotrr_rollout_guardrail_breached": {"experiment", "guardrail"},
    "ray_cotrr_rollout_decisions_total": {"experiment", "action"},
}


@dataclass(frozen=True)
class Metric:
    name: str  # as defined, e.g. cotrr_rerank_requests
    kind: str  # Counter | Gauge | Histogram
    labels: frozenset[str]
    where: str

    def exported(self) -> dict[str, frozenset[str]]:
        """Prometheus series name -> its labels, as Ray exports this metric."""
        base = f"ray_{self.name}"
        if self.kind == "Counter":
            return {f"{base}_total": self.labels}
        if self.kind == "Histogram":
            return {f"{base}_bucket": self.labels | {"le"}, f"{base}_sum": self.labels, f"{base}_count": self.labels}
        return {base: self.labels}


def _uses_serve_metrics(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ray.serve.metrics":
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "ray.serve"
            and any(a.name == "metrics" for a in node.names)
        ):
            return True
    return False


def defined_metrics(path: Path, label: str) -> list[Metric]:
    """Every Counter/Gauge/Histogram(<literal name>, ..., tag_keys=(<literals>)) in one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    serve_tags = SERVE_TAGS if _uses_serve_metrics(tree) else frozenset()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kind = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if kind not in ("Counter", "Gauge", "Histogram") or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        tags: set[str] = set()
        for kw in node.keywords:
            if kw.arg == "tag_keys" and isinstance(kw.value, ast.Tuple | ast.List):
                tags |= {e.value for e in kw.value.elts if isinstance(e, ast.Constant)}
        out.append(Metric(first.value, kind, frozenset(tags) | serve_tags, f"{label}:{node.lineno}"))
    return out


def exported_series() -> dict[str, frozenset[str]]:
    spec = importlib.util.find_spec("ray")  # the installed Ray's source, without importing it
    serve_dir = Path(spec.origin).parent / "serve"
    metrics = [m for p in sorted(PACKAGE.rglob("*.py")) for m in defined_metrics(p, str(p.relative_to(REPO)))]
    metrics += [m for rel in RAY_SERVE_MODULES for m in defined_metrics(serve_dir / rel, f"ray/serve/{rel}")]
    out: dict[str, frozenset[str]] = {}
    for m in metrics:
        out.update(m.exported())
    return out


# ----------------------------------------------------------------------------- the dashboard's side

_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by", "without",
    "label_values", "on", "ignoring", "group_left", "group_right", "le",
}  # fmt: skip


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["query"]["query"]))
    return out


def series_in(expr: str) -> list[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_strings = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*[a-zA-Z_]+\s*\)", r"\1", no_strings)
    no_braces = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", no_braces)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_groupings)
    return [m for m in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_ranges) if m not in _FUNCTIONS]


def labels_in(expr: str) -> set[str]:
    """Label names the expression filters or groups on (selectors, by/without, label_values)."""
    labels = set()
    for sel in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    for grp in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in grp.split(",") if x.strip()}
    for lv in re.findall(r"label_values\(\s*[a-zA-Z_:][a-zA-Z0-9_:]*\s*,\s*([a-zA-Z_]+)\s*\)", expr):
        labels.add(lv)
    return labels


def problems(dash: dict, exported: dict[str, frozenset[str]], only: set[str] | None = None) -> list[str]:
    """Every series the dashboard names that is not exported, or queried by a label it lacks."""
    out = []
    for where, expr in queries(dash):
        names = series_in(expr)
        if only is not None:
            names = [n for n in names if n in only]
            if not names:
                continue
        elif not names:
            out.append(f"{where}: names no series: {expr}")
        for n in names:
            if n not in exported:
                out.append(f"{where}: {n} is not exported")
                continue
            # every label the expression uses must exist on each of its series (le: on _bucket only)
            missing = labels_in(expr) - exported[n]
            if missing:
                out.append(f"{where}: {n} has no label(s) {sorted(missing)} (it has {sorted(exported[n])})")
    return out


def cotrr_part(dash: dict) -> list[str]:
    return [p for p in problems(dash, exported_series()) if not any(s in p for s in EXPERIMENT_SERIES)]


# ----------------------------------------------------------------------------- tests


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["uid"] == "cotrr-ray" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
            if not any(name in t["expr"] for name in EXPERIMENT_SERIES):  # the controller's: no application
                assert 'application=~"$application"' in t["expr"], (p["title"], t["expr"])


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    named = {n for _, expr in queries(dashboard()) for n in series_in(expr)}
    wanted = {
        "requests by arm": "ray_cotrr_rerank_requests_total",
        "fallbacks by arm": "ray_cotrr_fallback_ratio",
        "latency": "ray_cotrr_rerank_latency_ms_bucket",
        "batch size": "ray_cotrr_scorer_batches_total",
        "shadow agreement": "ray_cotrr_shadow_overlap_at_10_bucket",
        "event-log commits": "ray_cotrr_event_log_records_total",
        **dict(zip(("experiment stage", "guardrails", "decisions"), EXPERIMENT_SERIES)),
    }
    assert not {what: s for what, s in wanted.items() if s not in named}


def test_every_cotrr_and_serve_series_of_the_dashboard_is_exported() -> None:
    assert not cotrr_part(dashboard())


def test_the_experiment_series_of_the_dashboard_are_exported() -> None:
    named = {n for _, expr in queries(dashboard()) for n in series_in(expr)}
    assert set(EXPERIMENT_SERIES) <= named  # the dashboard shows the controller's stage, guardrails, decisions
    found = problems(dashboard(), exported_series(), only=set(EXPERIMENT_SERIES))
    assert not found, found
    exported = exported_series()
    for name, labels in EXPERIMENT_SERIES.items():
        assert labels <= exported[name], (name, exported[name])


def test_the_check_is_not_vacuous(tmp_path) -> None:
    """The derivation finds the app's series, and the check fails on a wrong name or a wrong label."""
    exported = exported_series()
    assert exported["ray_cotrr_rerank_requests_total"] >= {"arm", "outcome", "application"}
    assert "ray_cotrr_rerank_latency_ms_bucket" in exported and "ray_cotrr_rerank_latency_ms" not in exported
    assert "ray_cotrr_rollout_percentage" in exported and "ray_cotrr_rollout_percentage_total" not in exported
    assert "ray_serve_deployment_processing_latency_ms_bucket" in exported
    assert exported["ray_serve_actual_batch_size_bucket"] >= {"function_name", "deployment", "le"}
    bad = dashboard()
    target = next(p for p in bad["panels"] if p["type"] != "row")["targets"][0]
    target["expr"] = 'sum by (arm) (rate(ray_cotrr_rerank_requests{application=~"$application"}[5m]))'
    assert any("ray_cotrr_rerank_requests is not exported" in p for p in cotrr_part(bad))
    target["expr"] = 'sum by (model_version) (rate(ray_cotrr_rerank_requests_total{application=~"$application"}[5m]))'
    assert any("has no label(s) ['model_version']" in p for p in cotrr_part(bad))
    target["expr"] = "histogram_quantile(0.5, sum by (le) (rate(ray_cotrr_rerank_requests_total[5m])))"
    assert any("ray_cotrr_rerank_requests_total has no label(s) ['le']" in p for p in cotrr_part(bad))
    # a planted definition is found, tags and Serve's tags included, as the controller's will be
    mod = tmp_path / "m.py"
    mod.write_text("from ray.serve.metrics import Gauge\ng = Gauge('cotrr_x', description='', tag_keys=('e',))\n")
    (m,) = defined_metrics(mod, "m.py")
    assert m.exported() == {"ray_cotrr_x": frozenset({"e"}) | SERVE_TAGS}
    mod.write_text("from ray.util.metrics import Counter\nc = Counter('cotrr_y', tag_keys=('a',))\n")
    assert defined_metrics(mod, "m.py")[0].exported() == {"ray_cotrr_y_total": frozenset({"a"})}


@pytest.mark.integration
def test_the_naming_rule_holds_on_a_real_scrape(serve_session, page_app, records) -> None:
    """What `exported_series` derives is what Ray exports: after real traffic (reranks, feedback, an
    event log), every series the dashboard names that this traffic touches is on the Prometheus
    endpoint under the derived name, carrying every label derived for it."""
    import httpx
    from _page_app import PREFIX, send_traffic
    from test_app import wait_for

    send_traffic(f"{serve_session.http_url}{PREFIX}", records, 30, "scrape")
    exported = exported_series()
    touched = {
        "ray_cotrr_rerank_requests_total",
        "ray_cotrr_rerank_latency_ms_bucket",
        "ray_cotrr_scorer_lists_total",
        "ray_cotrr_scorer_batches_total",
        "ray_cotrr_fallback_ratio",
        "ray_cotrr_rollout_percentage",
        "ray_cotrr_event_log_records_total",
        "ray_cotrr_event_log_commit_ms_bucket",
        "ray_cotrr_feedback_events_total",
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_serve_actual_batch_size_bucket",
    }
    assert touched <= {n for _, expr in queries(dashboard()) for n in series_in(expr)}
    line = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} ")
    seen: dict[str, set[str]] = {}

    def scrape():
        try:
            text = httpx.get(serve_session.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        for m in map(line.match, text.splitlines()):
            if m and m.group(1) in touched and 'application="page"' in m.group(2):
                seen.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2)))
        return seen if touched <= set(seen) else None

    # 120 s: Ray exports each metric on its own schedule, and a busy 2-core box has taken > 60 s (test_app).
    try:
        wait_for(scrape, 120, 2, "the dashboard's series on the Prometheus endpoint")
    except AssertionError as e:
        raise AssertionError(f"{e}; never seen: {sorted(touched - set(seen))}") from None
    for name in touched:
        assert exported[name] <= seen[name], (name, sorted(exported[name] - seen[name]))
