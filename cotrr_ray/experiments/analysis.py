"""Experiment analysis over the event log, in DuckDB (embedded, in-process; SQL, no Python loops).

    con = connect("s3://bucket/events")             # or a local log directory
    units = unit_table(con, experiment_salt="rerank-v1")    # per (unit, arm) sums -> stats
    arms = arm_metrics(con, experiment_salt="rerank-v1", k=10)
    summary = feedback_summary(con)                 # events, duplicates, orphans

`connect` loads both kinds into tables with an explicit schema (`events.DECISION_COLUMNS`,
`FEEDBACK_COLUMNS`): a local log is read in place with ``read_json``; an ``s3://`` log is first
copied segment by segment through `cotrr_ray.storage` into a temporary directory (DuckDB's httpfs
extension is not assumed to be installable). Lines that are not complete JSON (the partial last
line of a segment whose writer was killed) are skipped, and counted in `feedback_summary`.

Definitions (per decision = per query):
- decisions are deduplicated by request_id, feedback by event_id (a retried event counts once);
- a click counts when a click event names an item of that decision's displayed list; several
  click events on one item count once (`clicks` = distinct clicked items);
- `impressions` = distinct items with an impression event (0 when clients send none);
- first click rank: the smallest clicked position (0-based); reciprocal rank = 1 / (position + 1),
  0 for a query without clicks; abandonment = queries without a click / queries;
- CTR@k = clicked items at positions < k / displayed items at positions < k;
- orphans = feedback events whose request_id is in no decision record of the log.
The unit of randomisation is `unit_id` (see `experiments.assignment`): `unit_table` gives the
per-unit sums the statistics need (ratio metrics need the delta method over units, not queries).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa

from cotrr_ray.experiments.events import DECISION_COLUMNS, FEEDBACK_COLUMNS
from cotrr_ray.storage import Location, download_file, list_dir, locate

_COLUMNS = {"decision": DECISION_COLUMNS, "feedback": FEEDBACK_COLUMNS}


def segment_files(root: Location, kind: str) -> list[Location]:
    """Every ``.jsonl`` segment of `kind` under the log root, in name order."""
    base = root.child(f"kind={kind}")
    out = []
    for date, is_dir in list_dir(base):
        if is_dir and date.startswith("date="):
            out += [base.child(date, n) for n, d in list_dir(base.child(date)) if not d and n.endswith(".jsonl")]
    return out


def _struct(columns: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in columns.items()) + "}"


def _load(con: duckdb.DuckDBPyConnection, table: str, kind: str, paths: list[str]) -> None:
    cols = _COLUMNS[kind]
    if not paths:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM (SELECT {_typed_nulls(cols)}) WHERE false")
        con.execute(f"CREATE OR REPLACE TABLE {table}_bad AS SELECT 0 AS n")
        return
    # ignore_errors: a torn last line becomes a row of nulls, dropped here and counted as bad.
    con.execute(
        f"CREATE OR REPLACE TABLE {table}_all AS SELECT * FROM read_json(?, format='newline_delimited', "
        f"columns={_struct(cols)}, ignore_errors=true, hive_partitioning=false)",
        [paths],
    )
    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM {table}_all WHERE kind = '{kind}'")
    con.execute(f"CREATE OR REPLACE TABLE {table}_bad AS SELECT count(*) AS n FROM {table}_all WHERE kind IS NULL")
    con.execute(f"DROP TABLE {table}_all")


def _typed_nulls(cols: dict[str, str]) -> str:
    return ", ".join(f"CAST(NULL AS {t}) AS {k}" for k, t in cols.items())


def connect(log_uri: str, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding the log: tables `raw_decisions`, `raw_feedback`; views
    `decisions` (one per request_id) and `feedback` (one per event_id)."""
    con = con or duckdb.connect()
    root = locate(log_uri)
    with tempfile.TemporaryDirectory(prefix="cotrr-analysis-") as tmp:
        for kind, table in (("decision", "raw_decisions"), ("feedback", "raw_feedback")):
            files = segment_files(root, kind)
            if root.local:
                paths = [f.path for f in files]
            else:
                paths = []
                for i, f in enumerate(files):
                    dst = Path(tmp) / f"{kind}-{i:06d}.jsonl"
                    download_file(f, dst)
                    paths.append(str(dst))
            _load(con, table, kind, paths)  # tables are materialised, so the copies can go
    _views(con)
    return con


class LiveLog:
    """A DuckDB connection over a log that keeps growing, refreshed incrementally (the rollout controller
    looks every minute; `connect` would re-read the whole log each time).

    `refresh()` loads the segments that are new since the last refresh, and again those whose size
    changed (a local segment that a writer is still appending to: its rows are replaced, so a torn
    last line read before is read whole the next time). Object-store segments are uploaded whole
    (`eventlog`), so one read each is enough. The tables and views are those of `connect`, so every
    function of this module takes a `LiveLog.con`."""

    def __init__(self, log_uri: str):
        self.root = locate(log_uri)
        self.con = duckdb.connect()
        self._seen: dict[str, int | None] = {}  # segment uri -> size when loaded (None: object store)
        for kind, table in (("decision", "raw_decisions"), ("feedback", "raw_feedback")):
            cols = _COLUMNS[kind]
            self.con.execute(
                f"CREATE TABLE {table} AS SELECT *, CAST(NULL AS VARCHAR) AS _file FROM (SELECT {_typed_nulls(cols)}) "
                "WHERE false"
            )
            self.con.execute(f"CREATE TABLE {table}_torn (_file VARCHAR, n BIGINT)")
            self.con.execute(f"CREATE VIEW {table}_bad AS SELECT coalesce(sum(n), 0) AS n FROM {table}_torn")
        _views(self.con)

    def refresh(self) -> int:
        """Load what is new; returns the number of segments (re)loaded."""
        n = 0
        with tempfile.TemporaryDirectory(prefix="cotrr-livelog-") as tmp:
            for kind, table in (("decision", "raw_decisions"), ("feedback", "raw_feedback")):
                changed = []
                for f in segment_files(self.root, kind):
                    size = Path(f.path).stat().st_size if self.root.local else None
                    if f.uri not in self._seen or self._seen[f.uri] != size:
                        changed.append((f, size))
                for f, size in changed:
                    self._load_one(kind, table, f, tmp)
                    self._seen[f.uri] = size
                n += len(changed)
        return n

    def _load_one(self, kind: str, table: str, f: Location, tmp: str) -> None:
        path = f.path
        if not self.root.local:
            path = str(Path(tmp) / f"{len(self._seen)}.jsonl")
            download_file(f, Path(path))
        self.con.execute(f"DELETE FROM {table} WHERE _file = ?", [f.uri])
        self.con.execute(f"DELETE FROM {table}_torn WHERE _file = ?", [f.uri])
        rows = (
            f"SELECT * FROM read_json(?, format='newline_delimited', columns={_struct(_COLUMNS[kind])}, "
            "ignore_errors=true, hive_partitioning=false)"
        )
        self.con.execute(f"INSERT INTO {table} SELECT *, ? AS _file FROM ({rows}) WHERE kind = '{kind}'", [f.uri, path])
        self.con.execute(f"INSERT INTO {table}_torn SELECT ?, count(*) FROM ({rows}) WHERE kind IS NULL", [f.uri, path])

    def close(self) -> None:
        self.con.close()


def _views(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE OR REPLACE VIEW decisions AS SELECT * FROM raw_decisions "
        "QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY ts) = 1"
    )
    con.execute(
        "CREATE OR REPLACE VIEW feedback AS SELECT * FROM raw_feedback "
        "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY received_at) = 1"
    )


def _con(source: str | duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    return connect(source) if isinstance(source, str) else source


# The window of one rollout stage (`stage_window`): decisions since the stage began, made under its
# split (a Router that has not applied the new config yet still logs the old percentage).
_NO_WINDOW = {"since": None, "rollout": None, "shadow": None}

# One row per displayed item of the decisions in the CTE `d`: the columns of `items` unnested side
# by side (a shorter column, e.g. `team` of the merged window only, pads with NULL), position = index.
_SHOWN = """
    SELECT d.request_id, d.unit_id, d.ts, generate_subscripts(d.items.item_id, 1) - 1 AS position,
        unnest(d.items.item_id) AS item_id, unnest(d.items.team) AS team,
        unnest(d.items.competitive) AS competitive
    FROM d
"""

_PER_QUERY = (
    """
WITH d AS (
    SELECT * FROM decisions
    WHERE ($salt IS NULL OR experiment_salt = $salt) AND ($until IS NULL OR ts <= $until)
        AND ($since IS NULL OR ts >= $since) AND ($rollout IS NULL OR rollout_percentage = $rollout)
        AND ($shadow IS NULL OR shadow = $shadow)
),
clicks AS (SELECT DISTINCT request_id, item_id FROM feedback WHERE type = 'click'),
imps AS (SELECT DISTINCT request_id, item_id FROM feedback WHERE type = 'impression'),
shown AS ("""
    + _SHOWN
    + """),
per_item AS (
    SELECT s.request_id, s.position, c.item_id IS NOT NULL AS clicked, i.item_id IS NOT NULL AS impressed
    FROM shown s
    LEFT JOIN clicks c ON c.request_id = s.request_id AND c.item_id = s.item_id
    LEFT JOIN imps i ON i.request_id = s.request_id AND i.item_id = s.item_id
),
agg AS (
    SELECT request_id,
        count(*) FILTER (WHERE clicked) AS clicks,
        count(*) FILTER (WHERE impressed) AS impressions,
        min(position) FILTER (WHERE clicked) AS first_click,
        count(*) FILTER (WHERE clicked AND position < $k) AS clicks_at_k,
        count(*) FILTER (WHERE position < $k) AS shown_at_k
    FROM per_item GROUP BY request_id
),
per_query AS (
    SELECT d.request_id, d.unit_id, d.arm, d.latency_ms, d.fallback,
        coalesce(a.clicks, 0) AS clicks, coalesce(a.impressions, 0) AS impressions,
        coalesce(1.0 / (a.first_click + 1), 0.0) AS rr,
        coalesce(a.clicks_at_k, 0) AS clicks_at_k, coalesce(a.shown_at_k, 0) AS shown_at_k
    FROM d LEFT JOIN agg a USING (request_id)
)
"""
)


def unit_table(
    source: str | duckdb.DuckDBPyConnection,
    experiment_salt: str | None = None,
    *,
    k: int = 10,
    until: float | None = None,
) -> pa.Table:
    """Per (unit_id, arm): queries, clicks, clicked_queries, impressions, rr_sum (and clicks_at_k,
    shown_at_k for CTR@k); the sums a statistics module takes. Sorted by arm, unit_id.

    ``until`` (a decision timestamp) keeps only decisions made by then: the experiment as it stood
    at that look, for the running confidence sequence."""
    sql = (
        _PER_QUERY
        + """
    SELECT unit_id, arm, count(*) AS queries, sum(clicks)::BIGINT AS clicks,
        count(*) FILTER (WHERE clicks > 0) AS clicked_queries, sum(impressions)::BIGINT AS impressions,
        sum(rr) AS rr_sum, sum(clicks_at_k)::BIGINT AS clicks_at_k, sum(shown_at_k)::BIGINT AS shown_at_k
    FROM per_query GROUP BY unit_id, arm ORDER BY arm, unit_id
    """
    )
    params = {"salt": experiment_salt, "k": k, "until": until, **_NO_WINDOW}
    return _con(source).sql(sql, params=params).to_arrow_table()


def arm_metrics(
    source: str | duckdb.DuckDBPyConnection, experiment_salt: str | None = None, *, k: int = 10
) -> pa.Table:
    """Per arm: units, queries, clicks, clicks_per_query, ctr_at_k, abandonment, mrr, latency
    percentiles (p50/p95/p99, ms) and fallback_rate. Point estimates; intervals are `stats`' job."""
    sql = (
        _PER_QUERY
        + """
    SELECT arm, count(DISTINCT unit_id) AS units, count(*) AS queries, sum(clicks)::BIGINT AS clicks,
        sum(clicks) / count(*) AS clicks_per_query,
        CASE WHEN sum(shown_at_k) > 0 THEN sum(clicks_at_k) / sum(shown_at_k) END AS ctr_at_k,
        count(*) FILTER (WHERE clicks = 0) / count(*) AS abandonment,
        avg(rr) AS mrr, sum(impressions)::BIGINT AS impressions,
        quantile_cont(latency_ms, 0.5) AS latency_p50_ms, quantile_cont(latency_ms, 0.95) AS latency_p95_ms,
        quantile_cont(latency_ms, 0.99) AS latency_p99_ms, avg(fallback::INTEGER) AS fallback_rate
    FROM per_query GROUP BY arm ORDER BY arm
    """
    )
    return _con(source).sql(sql, params={"salt": experiment_salt, "k": k, "until": None, **_NO_WINDOW}).to_arrow_table()


def stage_window(
    source: str | duckdb.DuckDBPyConnection,
    experiment_salt: str,
    *,
    since: float,
    rollout_percentage: float,
    shadow: bool,
    until: float | None = None,
    k: int = 10,
) -> dict[str, object]:
    """One rollout stage's window (decisions at ``ts >= since`` under that split): what its controller judges.

    Returns ``arms`` (per arm: units seen in that arm only, queries, fallbacks, errors = fallbacks whose
    reason is a scorer error, latency_p99_ms), ``units_in_multiple_arms``, ``all_units``, ``units`` (the
    per (unit, arm) sums of `unit_table` over the window) and ``preference`` (per unit: the mean
    interleaving preference h_treatment - h_control of its interleaved queries, competitive rounds)."""
    con = _con(source)
    params = {"salt": experiment_salt, "k": k, "until": until, "since": since, "rollout": rollout_percentage,
              "shadow": shadow}  # fmt: skip
    health = con.sql(
        _PER_QUERY
        + """
    , multi AS (SELECT unit_id FROM d GROUP BY unit_id HAVING count(DISTINCT arm) > 1)
    SELECT arm, count(DISTINCT unit_id) FILTER (WHERE unit_id NOT IN (SELECT unit_id FROM multi)) AS units,
        count(*) AS queries, count(*) FILTER (WHERE fallback) AS fallbacks,
        count(*) FILTER (WHERE fallback AND fallback_reason LIKE '%_error:%') AS errors,
        quantile_cont(latency_ms, 0.99) AS latency_p99_ms,
        (SELECT count(*) FROM multi) AS multi, (SELECT count(DISTINCT unit_id) FROM d) AS all_units
    FROM d GROUP BY arm ORDER BY arm
    """,
        params=params,
    ).fetchall()
    units = con.sql(
        _PER_QUERY
        + """
    SELECT unit_id, arm, count(*) AS queries, sum(clicks)::BIGINT AS clicks, sum(rr) AS rr_sum,
        sum(clicks_at_k)::BIGINT AS clicks_at_k, sum(shown_at_k)::BIGINT AS shown_at_k
    FROM per_query GROUP BY unit_id, arm ORDER BY arm, unit_id
    """,
        params=params,
    ).to_arrow_table()
    pref = con.sql(
        """
    WITH d AS (
        SELECT * FROM decisions WHERE mode = 'interleave' AND NOT fallback AND experiment_salt = $salt
            AND ts >= $since AND ($until IS NULL OR ts <= $until) AND rollout_percentage = $rollout
    ),
    clicks AS (SELECT DISTINCT request_id, item_id FROM feedback WHERE type = 'click'),
    shown AS ("""
        + _SHOWN
        + """),
    per_query AS (
        SELECT any_value(s.unit_id) AS unit_id,
            count(c.item_id) FILTER (WHERE s.team = 'treatment' AND s.competitive)
                - count(c.item_id) FILTER (WHERE s.team = 'control' AND s.competitive) AS pref
        FROM shown s LEFT JOIN clicks c ON c.request_id = s.request_id AND c.item_id = s.item_id
        GROUP BY s.request_id
    )
    SELECT unit_id, avg(pref) AS preference FROM per_query GROUP BY unit_id ORDER BY unit_id
    """,
        params={k_: params[k_] for k_ in ("salt", "since", "until", "rollout")},
    ).to_arrow_table()
    arms = {
        r[0]: {"units": r[1], "queries": r[2], "fallbacks": r[3], "errors": r[4], "latency_p99_ms": r[5]}
        for r in health
    }
    return {
        "arms": arms,
        "units_in_multiple_arms": health[0][6] if health else 0,
        "all_units": health[0][7] if health else 0,
        "units": units,
        "preference": pref,
    }


_INTERLEAVED = (
    """
WITH d AS (
    SELECT * FROM decisions
    WHERE mode = 'interleave' AND NOT fallback AND ($salt IS NULL OR experiment_salt = $salt)
),
clicks AS (SELECT DISTINCT request_id, item_id FROM feedback WHERE type = 'click'),
shown AS ("""
    + _SHOWN
    + """)
SELECT s.request_id, any_value(s.unit_id) AS unit_id, any_value(s.ts) AS ts,
    count(c.item_id) FILTER (WHERE s.team = 'treatment' AND (s.competitive OR NOT $competitive_only))
        AS h_treatment,
    count(c.item_id) FILTER (WHERE s.team = 'control' AND (s.competitive OR NOT $competitive_only)) AS h_control
FROM shown s LEFT JOIN clicks c ON c.request_id = s.request_id AND c.item_id = s.item_id
GROUP BY s.request_id ORDER BY ts, s.request_id
"""
)


def interleaved_queries(
    source: str | duckdb.DuckDBPyConnection, experiment_salt: str | None = None, *, competitive_only: bool = True
) -> pa.Table:
    """Per interleaved decision (fallbacks excluded: nothing was merged): request_id, unit_id, ts, and
    the clicks credited to each team, h_treatment and h_control (distinct clicked items of that team;
    with ``competitive_only``, only items of competitive rounds, as `interleaving.credit` does)."""
    params = {"salt": experiment_salt, "competitive_only": competitive_only}
    return _con(source).sql(_INTERLEAVED, params=params).to_arrow_table()


def decision_span(source: str | duckdb.DuckDBPyConnection, experiment_salt: str | None = None) -> dict[str, object]:
    """First and last decision time, the modes and the rollout percentages seen for the experiment."""
    row = (
        _con(source)
        .execute(
            "SELECT min(ts), max(ts), count(*), list(DISTINCT mode ORDER BY mode), "
            "list(DISTINCT rollout_percentage ORDER BY rollout_percentage) "
            "FROM decisions WHERE $salt IS NULL OR experiment_salt = $salt",
            {"salt": experiment_salt},
        )
        .fetchall()[0]  # fetchall: DuckDB 2 keeps the connection busy until a result is drained
    )
    return dict(zip(["first_ts", "last_ts", "decisions", "modes", "rollout_percentages"], row))


def feedback_summary(source: str | duckdb.DuckDBPyConnection) -> dict[str, object]:
    """Counts over the whole log: raw and distinct events, duplicates, by type, orphans (unknown
    request_id), events on items the decision did not display, and unreadable (torn) lines."""
    con = _con(source)
    row = con.execute(
        """
        WITH d AS (SELECT * FROM decisions), shown AS ("""
        + _SHOWN
        + """)
        SELECT (SELECT count(*) FROM raw_feedback) AS raw_events,
            (SELECT count(*) FROM feedback) AS events,
            (SELECT count(*) FROM feedback f WHERE f.request_id NOT IN (SELECT request_id FROM decisions))
                AS orphans,
            (SELECT count(*) FROM feedback f WHERE f.request_id IN (SELECT request_id FROM decisions)
                AND NOT EXISTS (SELECT 1 FROM shown s WHERE s.request_id = f.request_id AND s.item_id = f.item_id))
                AS unmatched_items,
            (SELECT count(*) FROM raw_decisions) AS raw_decisions,
            (SELECT count(*) FROM decisions) AS decisions,
            (SELECT n FROM raw_feedback_bad) + (SELECT n FROM raw_decisions_bad) AS unreadable_lines
        """
    ).fetchall()[0]
    names = ["raw_events", "events", "orphans", "unmatched_items", "raw_decisions", "decisions", "unreadable_lines"]
    out: dict[str, object] = dict(zip(names, row))
    out["duplicates"] = out["raw_events"] - out["events"]
    out["by_type"] = dict(con.execute("SELECT type, count(*) FROM feedback GROUP BY type ORDER BY type").fetchall())
    return out


def event_ids(source: str | duckdb.DuckDBPyConnection) -> set[str]:
    """The distinct event ids in the log (durability checks)."""
    return {r[0] for r in _con(source).execute("SELECT event_id FROM feedback").fetchall()}
