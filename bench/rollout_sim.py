"""Simulated traffic for the rollout controller: decision and feedback records written straight into an
event log directory, under whatever routing the controller last applied, on a virtual clock.

Used by bench/rollout_bench.py (the offline scenarios) and tests/test_rollout_controller.py. Ray-free.

The world: `users` units, each with a click propensity (Gamma, mean 1: users differ, which is the
variance an A/B metric fights); every tick `queries_per_tick` queries from random users, each over
`n_items` candidates with hidden graded labels 0..4. A ranker orders them by label + Gaussian noise
(`control_noise`, `treatment_noise`: a smaller noise is a better ranker, so the gap is known and set
by the two noises); clicks come from `cotrr_ray.experiments.simulator` (position-based model). The
Router's rules are applied as in `serving.service`: arm by `assignment.decide`, shadow answers
control, interleave shows the team-draft merge, a broken treatment falls back to upstream order with
`scorer_error:...`, and `lose_treatment_units` drops every decision record of a share of the exposed
arm's units (a logging bug on one client platform, say: what a sample ratio mismatch exposes; losing
random records instead would barely change the count of distinct units, which is what SRM counts).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cotrr_ray.experiments.assignment import decide
from cotrr_ray.experiments.events import SCHEMA_VERSION
from cotrr_ray.experiments.interleaving import team_draft
from cotrr_ray.experiments.simulator import ClickModel, simulate_clicks_batch

T0 = 1_764_000_000.0  # virtual clock origin (2025-11-24 UTC): dates partition the log as real ones do


@dataclass
class World:
    users: int = 3000
    queries_per_tick: int = 300
    n_items: int = 10
    control_noise: float = 1.5
    treatment_noise: float = 1.5
    broken_from: float | None = None  # virtual time from which the treatment scorer raises
    lose_treatment_units: float = 0.0  # share of exposed units whose decision records are all lost
    latency_ms: float = 15.0
    seed: int = 0
    click_model: ClickModel = field(default_factory=lambda: ClickModel(eta=1.0, noise=0.05))

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.propensity = self.rng.gamma(2.0, 0.5, self.users)
        self.counter = 0
        self.first_failure: float | None = None
        self.answered = {"control": 0, "treatment": 0, "interleave": 0}


def _order(labels: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    return np.argsort(-(labels + rng.normal(0.0, noise, labels.shape)), kind="stable")


def _rank(w: World, arm: str, mode: str, labels: np.ndarray, rid: str, salt: str, broken: bool):
    """(displayed order, items' team/competitive or None, fallback reason) for one query."""
    n = labels.size
    if arm == "control":
        return _order(labels, w.control_noise, w.rng), None, None
    if broken:
        return np.arange(n), None, "scorer_error:RuntimeError"
    treat = _order(labels, w.treatment_noise, w.rng)
    if mode != "interleave":
        return treat, None, None
    control = _order(labels, w.control_noise, w.rng)
    merged = team_draft(treat.tolist(), control.tolist(), key=rid, salt=salt, k=n)
    return np.asarray(merged.order), merged, None


def traffic(w: World, log_dir: Path, routing: dict[str, Any], salt: str, t_from: float, t_to: float) -> int:
    """Write one tick of queries with ts in [t_from, t_to) under `routing`; returns the decisions written."""
    q = w.queries_per_tick
    ts = np.sort(w.rng.uniform(t_from, t_to, q))
    users = w.rng.integers(0, w.users, q)
    labels = w.rng.integers(0, 5, (q, w.n_items)).astype(np.float64)
    shadow, rollout, mode = routing["shadow_mode"], routing["rollout_percentage"], routing["mode"]
    decisions, rows, orders = [], [], []
    for i in range(q):
        unit, rid = f"u{users[i]}", uuid.UUID(int=int(w.rng.integers(0, 2**63)) << 64 | w.counter).hex
        w.counter += 1
        d = decide(unit, unit, salt=salt, rollout_percentage=rollout)
        arm = "control" if shadow else d.arm
        if arm == "treatment" and mode == "interleave":
            arm = "interleave"
        broken = w.broken_from is not None and ts[i] >= w.broken_from and arm != "control"
        if broken and w.first_failure is None:
            w.first_failure = float(ts[i])
        order, merged, fallback = _rank(w, arm, mode, labels[i], rid, salt, broken)
        w.answered[arm] += 1
        orders.append(order)
        if arm != "control" and (d.bucket * 7919) % 1000 < w.lose_treatment_units * 1000:
            rows.append(None)  # answered, but its record never reached the log
            continue
        # events.Displayed's columns: position p is entry p of each
        items = {"item_id": [f"i{j}" for j in order], "upstream_index": [int(j) for j in order],
                 "score": [None] * len(order), "probability": [None] * len(order), "propensity": [1.0] * len(order),
                 "team": list(merged.teams) if merged else None,
                 "competitive": list(merged.competitive) if merged else None}  # fmt: skip
        lat = float(w.rng.lognormal(np.log(w.latency_ms), 0.3))
        decisions.append(_decision(rid, unit, d.bucket, arm, salt, routing, ts[i], lat, fallback, items, merged))
        rows.append(rid)
    shown = np.stack([labels[i][o] for i, o in enumerate(orders)])
    clicks = simulate_clicks_batch(shown, w.rng, w.click_model, propensity=w.propensity[users])
    feedback = [
        {"kind": "feedback", "schema_version": 1, "event_id": f"{rid}-{p}", "request_id": rid,
         "item_id": f"i{int(orders[i][p])}", "type": "click", "timestamp": float(ts[i]) + 1.0, "value": None,
         "received_at": float(ts[i]) + 1.0, "replica": "sim"}
        for i, rid in enumerate(rows) if rid is not None for p in np.flatnonzero(clicks[i])
    ]  # fmt: skip
    _segment(log_dir, "decision", t_from, decisions)
    _segment(log_dir, "feedback", t_from, feedback)
    return len(decisions)


def _decision(rid, unit, bucket, arm, salt, routing, ts, lat, fallback, items, merged) -> dict[str, Any]:
    return {
        "kind": "decision", "schema_version": SCHEMA_VERSION, "request_id": rid, "unit_id": unit, "query_id": rid,
        "bucket": bucket, "arm": arm, "mode": "interleave" if merged is not None else "ab",
        "experiment_salt": salt, "rollout_percentage": routing["rollout_percentage"],
        "shadow": routing["shadow_mode"], "model_id": None, "calibrator_version": None, "ts": float(ts),
        "latency_ms": lat, "fallback": fallback is not None, "fallback_reason": fallback,
        "n_candidates": len(items["item_id"]), "window": len(items["item_id"]), "items": items,
    }  # fmt: skip


def _segment(log_dir: Path, kind: str, t: float, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    date = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")
    d = log_dir / f"kind={kind}" / f"date={date}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"sim-{t:.3f}-{uuid.uuid4().hex[:8]}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
