"""The rollout controller: plan + event log + actuator, one `tick` at a time (Ray-free).

    ctl = Controller(plan, "artifacts/events", "rerank-v2", ServeRestActuator("http://127.0.0.1:8265", "rerank"),
                     promoter=RegistryPromoter("artifacts/registry", "demo"))   # serving.rollout
    ctl.tick()           # observe the stage's window (DuckDB), step the state machine, persist, act

Persisted beside the event log, under its URI (local or ``s3://``, through `cotrr_ray.storage`)::

    controller/<experiment>/decisions/<seq:010d>.json    one per decision, created exclusively
    controller/<experiment>/status.json                  the contract15 document (page, CLI, /v1/experiments)
    controller/<experiment>/commands/<ms>-<uuid>.json    queued operator commands (CLI, admin HTTP)
    kind=controller/date=<UTC date>/<experiment>-<seq:010d>.jsonl   each decision as an event-log line

Restart safety: a decision record carries the whole state after it. A (re)started controller reads
the highest-numbered record and is where it left off: same stage, same entered_at, same per-stage
tests. A decision's record is created with `storage.create_exclusive` under its seq, so a second
controller (or one that restarted and re-derived a decision) cannot write seq N twice: it gets
`AlreadyExists`, reloads and continues from the record that won. Every step after the record
(event-log line, Serve config, alias move, status.json) is idempotent and is redone on restart.

The actuator is level-triggered: each tick the Router's user_config is made to match
`rollout.routing_for(plan, state)` (read, compare, write only when different), so a person's edit
with `serve deploy` that contradicts the controller is reverted at the next tick, and a write that
failed (dashboard down) is retried without a new decision.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import orjson

from cotrr_ray.experiments import analysis
from cotrr_ray.experiments import stats as S
from cotrr_ray.experiments.rollout import (
    TERMINAL,
    ArmObs,
    Command,
    ControllerState,
    Decision,
    Observations,
    RolloutPlan,
    Summary,
    check_command,
    check_experiment_id,
    routing_for,
    start,
    step,
)
from cotrr_ray.storage import AlreadyExists, Location, create_exclusive, delete_file, list_dir, locate, read_bytes
from cotrr_ray.storage import write_bytes as _write

logger = logging.getLogger(__name__)

STATUS_VERSION = 1
RECENT_DECISIONS = 50  # in status.json; all of them are in decisions/ and the event log


# ============================================================================ persistence


class Store:
    """The controller's files for one experiment, beside the event log."""

    def __init__(self, log_uri: str, experiment_id: str):
        self.root = locate(log_uri)
        self.experiment_id = check_experiment_id(experiment_id)
        self.dir = self.root.child("controller", experiment_id)

    def _decision_loc(self, seq: int) -> Location:
        return self.dir.child("decisions", f"{seq:010d}.json")

    def decision_seqs(self) -> list[int]:
        names = [n for n, d in list_dir(self.dir.child("decisions")) if not d and n.endswith(".json")]
        return sorted(int(n.removesuffix(".json")) for n in names if n.removesuffix(".json").isdigit())

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(read_bytes(self._decision_loc(q))) for q in self.decision_seqs()]

    def last_record(self) -> dict[str, Any] | None:
        seqs = self.decision_seqs()
        return orjson.loads(read_bytes(self._decision_loc(seqs[-1]))) if seqs else None

    def record(self, decision: Decision, state: ControllerState) -> dict[str, Any]:
        """Create the decision's record (raises `AlreadyExists` when seq is taken), then its log line."""
        rec = {"kind": "controller", "experiment_id": self.experiment_id, **decision.model_dump(),
               "state": state.model_dump()}  # fmt: skip
        create_exclusive(self._decision_loc(decision.seq), orjson.dumps(rec))
        self.log_line(rec)
        return rec

    def log_line(self, rec: dict[str, Any]) -> None:
        """The decision as an event-log segment of one line (idempotent: same name, same bytes)."""
        date = datetime.fromtimestamp(rec["at"], UTC).strftime("%Y-%m-%d")
        line = {k: v for k, v in rec.items() if k != "state"} | {"state_after": rec["state"]["state"]}
        loc = self.root.child("kind=controller", f"date={date}", f"{self.experiment_id}-{rec['seq']:010d}.jsonl")
        _write(loc, orjson.dumps(line) + b"\n")

    def write_status(self, doc: dict[str, Any]) -> None:
        _write(self.dir.child("status.json"), orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def read_status(self) -> dict[str, Any] | None:
        try:
            return orjson.loads(read_bytes(self.dir.child("status.json")))
        except (FileNotFoundError, OSError):
            return None

    def submit(self, cmd: Command) -> None:
        name = f"{int(cmd.at * 1000):015d}-{cmd.id}.json"
        create_exclusive(self.dir.child("commands", name), orjson.dumps(cmd.model_dump()))

    def commands(self) -> list[tuple[str, Command]]:
        out = []
        for name, is_dir in list_dir(self.dir.child("commands")):
            if is_dir or not name.endswith(".json"):
                continue
            try:
                out.append((name, Command.model_validate_json(read_bytes(self.dir.child("commands", name)))))
            except (ValueError, OSError) as e:  # a hand-written bad file must not stop the controller
                logger.warning("ignoring unreadable command %s: %r", name, e)
        return out

    def drop_command(self, name: str) -> None:
        delete_file(self.dir.child("commands", name))


def experiments(log_uri: str) -> list[dict[str, Any]]:
    """Every experiment with a controller status under the log: id, state, stage, updated_at."""
    root = locate(log_uri).child("controller")
    out = []
    for name, is_dir in list_dir(root):
        if not is_dir:
            continue
        try:
            doc = orjson.loads(read_bytes(root.child(name, "status.json")))
        except (FileNotFoundError, OSError, ValueError):
            continue
        out.append(
            {"experiment_id": doc["experiment_id"], "state": doc["state"], "stage": doc["stage"],
             "updated_at": doc["updated_at"], "plan": doc["plan"]["name"]}
        )  # fmt: skip
    return sorted(out, key=lambda e: e["experiment_id"])


def new_command(action: str, *, stage: str | None = None, reason: str = "", actor: str = "operator", now=None):
    return Command(id=uuid.uuid4().hex, action=action, stage=stage, reason=reason, actor=actor,
                   at=time.time() if now is None else now)  # fmt: skip


def submit_command(log_uri: str, experiment_id: str, cmd: Command, stages: list[str] | None = None) -> str | None:
    """Queue `cmd` for the experiment's controller; returns why it was refused (None: queued).

    The state is the last decision record's (authoritative); the stage names are `stages`, or the
    plan in the controller's status.json."""
    store = Store(log_uri, experiment_id)
    rec = store.last_record()
    if stages is None:
        doc = store.read_status()
        stages = [s["name"] for s in doc["plan"]["stages"]] if doc else []
    why = check_command(stages, rec["state"]["state"] if rec else None, cmd)
    if why is None:
        store.submit(cmd)
    return why


def token_matches(presented: str | None, expected: str | None) -> bool:
    """Constant-time bearer-token check (no expected token: nobody matches)."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


# ============================================================================ observations


def _ratio(units, arm: str, num: str, den: str) -> Summary | None:
    mask = np.asarray(units.column("arm").to_pylist(), dtype=object) == arm
    x = np.asarray(units.column(num).to_numpy(), dtype=np.float64)[mask]
    y = np.asarray(units.column(den).to_numpy(), dtype=np.float64)[mask]
    if x.size < 2 or y.sum() <= 0:
        return None
    a = S.ratio_summary(x, y)
    return Summary(n=a.n, mean=a.mean, var_of_mean=a.var_of_mean)


_METRIC_COLUMNS = {"clicks_per_query": ("clicks", "queries"), "ctr_at_k": ("clicks_at_k", "shown_at_k"),
                   "mrr": ("rr_sum", "queries")}  # fmt: skip


class LogObserver:
    """The current stage's window from the event log (DuckDB over a `LiveLog`, refreshed each look)."""

    def __init__(self) -> None:
        self.live: analysis.LiveLog | None = None

    def __call__(self, log_uri: str, plan: RolloutPlan, state: ControllerState, now: float | None = None):
        if self.live is None:
            self.live = analysis.LiveLog(log_uri)
        self.live.refresh()
        stage = plan.stages[state.stage_index]
        w = analysis.stage_window(
            self.live.con, state.experiment_id, since=state.stage_entered_at,
            rollout_percentage=stage.rollout_percentage, shadow=stage.mode == "shadow", until=now, k=plan.k,
        )  # fmt: skip
        return observations_from_window(w, state)


def observations_from_window(w: dict[str, Any], state: ControllerState) -> Observations:
    metrics: dict[str, dict[str, Summary]] = {}
    for metric, (num, den) in _METRIC_COLUMNS.items():
        arms = {arm: _ratio(w["units"], arm, num, den) for arm in ("control", "treatment")}
        metrics[metric] = {a: v for a, v in arms.items() if v is not None}
    pref = np.asarray(w["preference"].column("preference").to_numpy(), dtype=np.float64)
    preference = None
    if pref.size >= 2:
        p = S.summarize(pref)
        preference = Summary(n=p.n, mean=p.mean, var_of_mean=p.var_of_mean)
    return Observations(
        stage_index=state.stage_index, since=state.stage_entered_at,
        arms={a: ArmObs(**v) for a, v in w["arms"].items()}, units_in_multiple_arms=w["units_in_multiple_arms"],
        all_units=w["all_units"], metrics=metrics, preference=preference,
    )  # fmt: skip


# ============================================================================ actuators


class Actuator(Protocol):
    """Where the decisions take effect: the Router's routing user_config."""

    def routing(self) -> dict[str, Any]:
        """The Router's current user_config (as deployed)."""

    def apply_routing(self, fields: dict[str, Any], reason: str) -> bool:
        """Merge `fields` into the Router's user_config if any differs; True when it wrote."""


class Promoter(Protocol):
    def promote(self, reason: str) -> str:
        """Point the production alias at the treatment; returns the bundle id (idempotent)."""


class MemoryActuator:
    """An in-process Router config (tests, offline simulation)."""

    def __init__(self, routing: dict[str, Any] | None = None):
        self.config: dict[str, Any] = dict(routing or {"rollout_percentage": 0.0, "shadow_mode": False, "mode": "ab"})
        self.writes: list[tuple[dict[str, Any], str]] = []

    def routing(self) -> dict[str, Any]:
        return dict(self.config)

    def apply_routing(self, fields: dict[str, Any], reason: str) -> bool:
        if all(self.config.get(k) == v for k, v in fields.items()):
            return False
        self.config.update(fields)
        self.writes.append((dict(fields), reason))
        return True


class ServeRestActuator:
    """Serve's declarative config over the dashboard's REST API: what `serve deploy` does.

    Reads ``GET /api/serve/applications/`` (every app's `deployed_app_config`), changes only the
    Router's user_config of `app`, and PUTs the whole `ServeDeploySchema` back (the API is
    declarative: an app missing from the PUT would be deleted, so all config-deployed apps go back as
    they were). `serve status` / `serve config` then show the new config, and the Router applies it in
    place through `reconfigure` (no replica restart). Only apps deployed from a config have a
    `deployed_app_config`; an app started from Python (`serve.run`) is refused with that reason.
    Serve's API has no compare-and-swap: a person's `serve deploy` racing a tick is last-writer-wins,
    and the next tick re-asserts the controller's routing.
    """

    def __init__(
        self, dashboard_url: str, app: str, *, experiment_salt: str | None = None, deployment: str = "Router",
        headers=None, timeout_s: float = 10.0,
    ):  # fmt: skip
        self.url = dashboard_url.rstrip("/") + "/api/serve/applications/"
        self.app, self.deployment, self.timeout_s = app, deployment, timeout_s
        self.experiment_salt = experiment_salt  # refuse to ramp a Router that runs another experiment
        self.headers = dict(headers or {})

    def _http(self, method: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url, data=body, method=method, headers=self.headers)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {self.url}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def _deploy_schema(self, require_app: bool = True) -> dict[str, Any]:
        details = json.loads(self._http("GET"))
        apps = details.get("applications") or {}
        if require_app and self.app not in apps:
            raise RuntimeError(f"no Serve application {self.app!r} (running: {sorted(apps)})")
        configs = [a["deployed_app_config"] for a in apps.values() if a.get("deployed_app_config")]
        if require_app and not apps[self.app].get("deployed_app_config"):
            raise RuntimeError(f"application {self.app!r} was not deployed from a config (serve deploy/run YAML)")
        schema = {"applications": configs}
        # The details carry these as the deploy schema's own types; a PUT without target_capacity resets it.
        for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
            if details.get(key) is not None:
                schema[key] = details[key]
        return schema

    def _router(self, schema: dict[str, Any]) -> dict[str, Any]:
        app = next(a for a in schema["applications"] if a["name"] == self.app)
        deps = app.setdefault("deployments", [])
        for d in deps:
            if d["name"] == self.deployment:
                return d
        deps.append({"name": self.deployment})
        return deps[-1]

    def routing(self) -> dict[str, Any]:
        return dict(self._router(self._deploy_schema()).get("user_config") or {})

    def apply_routing(self, fields: dict[str, Any], reason: str) -> bool:
        schema = self._deploy_schema()
        router = self._router(schema)
        current = dict(router.get("user_config") or {})
        salt = current.get("experiment_salt", "rerank-v1")  # RoutingConfig's default when unset
        if self.experiment_salt is not None and salt != self.experiment_salt:
            raise RuntimeError(
                f"the Router of {self.app!r} runs experiment {salt!r}, not {self.experiment_salt!r}: not touching it"
            )
        if all(current.get(k) == v for k, v in fields.items()):
            return False
        router["user_config"] = {**current, **fields}
        self._http("PUT", json.dumps(schema).encode())
        logger.info("rollout: Router user_config %s -> %s (%s)", current, router["user_config"], reason)
        return True

    def deploy_app(self, app_config: dict[str, Any]) -> None:
        """PUT `app_config` (one `ServeApplicationSchema` dict, named `self.app`) beside the other
        config-deployed apps, replacing its previous version: `serve deploy` of a file holding them all."""
        schema = self._deploy_schema(require_app=False)
        schema["applications"] = [a for a in schema["applications"] if a["name"] != self.app] + [app_config]
        self._http("PUT", json.dumps(schema).encode())


# ============================================================================ the controller


class Controller:
    """Loads or starts the experiment's state, then `tick()`s: observe, step, persist, act.

    `on_decision(decision, state)` runs after a decision is persisted (the Ray shell exports it as
    Prometheus series); `observer(log_uri, plan, state, now)` defaults to a `LogObserver` (DuckDB).
    """

    def __init__(
        self,
        plan: RolloutPlan,
        log_uri: str,
        experiment_id: str,
        actuator: Actuator,
        *,
        promoter: Promoter | None = None,
        clock: Callable[[], float] = time.time,
        on_decision: Callable[[Decision, ControllerState], None] | None = None,
        observer: Callable[..., Observations] | None = None,
    ):
        self.plan, self.log_uri = plan, log_uri
        self.store = Store(log_uri, experiment_id)
        self.actuator, self.promoter = actuator, promoter
        self.clock, self.on_decision = clock, on_decision
        self.observer = observer or LogObserver()
        self.state: ControllerState | None = None
        self.decisions: list[dict[str, Any]] = []  # recent records, for status.json
        self.errors: dict[str, str] = {}  # what failed at the last tick, by part: observe, actuator

    @property
    def experiment_id(self) -> str:
        return self.store.experiment_id

    def load(self) -> ControllerState:
        """Resume from the last decision record, or start (stage 0) when there is none."""
        recs = self.store.records()
        if recs:
            self.state = ControllerState.model_validate(recs[-1]["state"])
            # status.json holds the state of the latest tick (the per-stage tests' running minimum
            # p-values, a promotion done): fresher than the record when it is of the same decision.
            detail = (self.store.read_status() or {}).get("controller_state")
            if detail and detail.get("seq") == self.state.seq:
                self.state = ControllerState.model_validate(detail)
            self.decisions = [{k: v for k, v in r.items() if k != "state"} for r in recs[-RECENT_DECISIONS:]]
            self.store.log_line(recs[-1])  # may have been lost with the process that made the record
            self._act(Decision.model_validate({k: recs[-1][k] for k in Decision.model_fields}))
        else:
            state, decisions = start(self.plan, self.experiment_id, self.clock())
            self._persist(state, decisions)
        self._write_status()
        return self.state

    def tick(self) -> list[Decision]:
        """One evaluation; returns the decisions it made (persisted and acted on)."""
        if self.state is None:
            self.load()
        now = self.clock()
        commands = self.store.commands()
        try:  # a finished experiment is not observed any more (only a force command moves it again)
            obs = None if self.state.state in TERMINAL else self.observer(self.log_uri, self.plan, self.state, now)
            self.errors.pop("observe", None)
        except Exception as e:  # an unreadable log: no evaluation, but operator commands still apply
            logger.warning("rollout %s: observations failed: %r", self.experiment_id, e)
            self.errors["observe"], obs = f"observations failed: {e!r}", None
        new_state, decisions = step(self.plan, self.state, obs, now, [c for _, c in commands])
        try:
            self._persist(new_state, decisions)
        except AlreadyExists:  # another controller (or a restart) got there first: take its record
            logger.warning(
                "rollout %s: decision %d exists; resuming from the records", self.experiment_id, new_state.seq
            )
            self.load()
            return []
        for name, cmd in commands:
            if cmd.id in new_state.consumed:
                self.store.drop_command(name)
        if not decisions:
            self._reconcile("no change")  # guardrail values and per-stage tests moved: in status.json
        self._write_status()
        return decisions

    def _persist(self, final: ControllerState, decisions: list[Decision]) -> None:
        # Every record of a tick holds the tick's final state: resuming from any of them is consistent.
        # (A crash between two records of one tick leaves a gap in the seq numbers, never a duplicate.)
        for d in decisions:
            rec = self.store.record(d, final)
            self.decisions = (self.decisions + [{k: v for k, v in rec.items() if k != "state"}])[-RECENT_DECISIONS:]
            self.state = final
            self._act(d)
            if self.on_decision is not None:
                self.on_decision(d, self.state)
        self.state = final

    def _act(self, d: Decision) -> None:
        self._reconcile(d.reason)

    def _reconcile(self, reason: str) -> None:
        """Make the world match the state: the alias moved once after a promotion, the routing each tick."""
        s = self.state
        if s.state == "promoted" and s.promoted_bundle is None and self.promoter is not None:
            try:  # until it succeeds (a registry outage, a concurrent move: AliasConflict), at every tick
                s.promoted_bundle = self.promoter.promote(f"rollout {self.experiment_id}: {reason}")
                self.errors.pop("promote", None)
            except Exception as e:
                logger.warning("rollout %s: promotion failed: %r", self.experiment_id, e)
                self.errors["promote"] = f"promotion failed: {e!r}"
        try:
            self.actuator.apply_routing(routing_for(self.plan, self.state), reason)
            self.errors.pop("actuator", None)
        except Exception as e:  # retried at the next tick: the decision is already recorded
            logger.warning("rollout %s: applying the routing failed: %r", self.experiment_id, e)
            self.errors["actuator"] = f"actuator failed: {e!r}"

    def status(self) -> dict[str, Any]:
        """The contract15 document."""
        s = self.state
        stage = self.plan.stages[s.stage_index]
        return {
            "version": STATUS_VERSION,
            "experiment_id": s.experiment_id,
            "state": s.state,
            "updated_at": self.clock(),
            "plan": self.plan.summary(),
            "stage": {"index": s.stage_index, "name": stage.name, "mode": stage.mode,
                      "rollout_percentage": stage.rollout_percentage, "entered_at": s.stage_entered_at},
            "timeline": [t.model_dump() for t in s.timeline],
            "guardrails": [g.model_dump() for g in s.guardrails],
            "decisions": list(self.decisions),
            "routing": routing_for(self.plan, s),
            "started_at": s.started_at,
            "promoted_bundle": s.promoted_bundle,
            "last_error": "; ".join(self.errors.values()) or None,
            "controller_state": s.model_dump(),
        }  # fmt: skip

    def _write_status(self) -> None:
        self.store.write_status(self.status())
