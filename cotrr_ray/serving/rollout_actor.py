"""The rollout controller as a detached Ray actor that Ray restarts when it dies (the Ray shell of
`experiments.controller`).

    python -m cotrr_ray.serving.rollout_actor start --plan configs/rollouts/default.yaml \
        --log s3://bucket/events --experiment rerank-v2 --dashboard http://127.0.0.1:8265 --app rerank \
        [--registry s3://bucket/registry --model demo] [--interval 60] [--address auto]
    python -m cotrr_ray.serving.rollout_actor stop --experiment rerank-v2 [--address auto]

One actor per experiment, named ``rollout:<experiment>`` in namespace ``cotrr`` (a second `start`
finds it and refuses), `num_cpus=0`, `lifetime="detached"` (it outlives the driver that started it)
and `max_restarts=-1`: when its process dies Ray starts it again with the same arguments, and the
new `Controller` resumes from the decision records beside the event log (same stage, no duplicate
decision). It ticks every `interval_s` in a thread; `status()` and `tick_now()` can be called
meanwhile (a lock keeps one tick at a time).

Prometheus (Ray's metrics port, prefixed ``ray_`` like every Ray metric):
- ``cotrr_rollout_decisions{experiment, action}``: decisions made (counter);
- ``cotrr_rollout_stage{experiment}``: current stage index; ``cotrr_rollout_target_percentage``;
- ``cotrr_rollout_state{experiment, state}``: 1 for the current state, 0 for the others;
- ``cotrr_rollout_guardrail_breached{experiment, guardrail}``: 1 breached, 0 ok, -1 no data yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge

from cotrr_ray.experiments.controller import Controller, ServeRestActuator
from cotrr_ray.experiments.rollout import Decision, RolloutPlan, check_experiment_id, load_plan
from cotrr_ray.serving.rollout import RegistryPromoter

NAMESPACE = "cotrr"
STATES = ("running", "paused", "promoted", "rolled_back", "aborted", "concluded")
logger = logging.getLogger(__name__)


def actor_name(experiment_id: str) -> str:
    return f"rollout:{check_experiment_id(experiment_id)}"


def _ray_auth_headers() -> dict[str, str]:
    # Ray 2.60 turns token auth on for new clusters; the dashboard then wants the cluster's token.
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        return dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # an older or newer Ray without this helper: no auth headers
        return {}


class RolloutMetrics:
    def __init__(self, experiment_id: str) -> None:
        self.exp = experiment_id
        self.decisions = Counter(
            "cotrr_rollout_decisions", description="Rollout controller decisions.", tag_keys=("experiment", "action")
        )
        self.stage = Gauge("cotrr_rollout_stage", description="Current stage index.", tag_keys=("experiment",))
        self.target = Gauge(
            "cotrr_rollout_target_percentage",
            description="Rollout percentage the controller wants.",
            tag_keys=("experiment",),
        )
        self.state = Gauge(
            "cotrr_rollout_state", description="1 for the current state.", tag_keys=("experiment", "state")
        )
        self.guardrail = Gauge(
            "cotrr_rollout_guardrail_breached",
            description="1 breached, 0 ok, -1 insufficient data.",
            tag_keys=("experiment", "guardrail"),
        )

    def decision(self, d: Decision, _state: Any) -> None:
        self.decisions.inc(1, tags={"experiment": self.exp, "action": d.action})

    def snapshot(self, status: dict[str, Any]) -> None:
        tags = {"experiment": self.exp}
        self.stage.set(status["stage"]["index"], tags=tags)
        self.target.set(status["routing"]["rollout_percentage"], tags=tags)
        for s in STATES:
            self.state.set(1.0 if status["state"] == s else 0.0, tags={**tags, "state": s})
        codes = {"breached": 1.0, "ok": 0.0, "insufficient_data": -1.0}
        for g in status["guardrails"]:
            self.guardrail.set(codes[g["status"]], tags={**tags, "guardrail": g["name"]})


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RolloutActor:
    def __init__(self, settings: dict[str, Any]) -> None:
        plan = RolloutPlan.model_validate(settings["plan"])
        self.metrics = RolloutMetrics(settings["experiment"])
        promoter = None
        if settings.get("registry"):
            promoter = RegistryPromoter(settings["registry"], settings["model"])
        actuator = ServeRestActuator(
            settings["dashboard"], settings["app"], experiment_salt=settings["experiment"], headers=_ray_auth_headers()
        )
        self.ctl = Controller(
            plan, settings["log"], settings["experiment"], actuator, promoter=promoter,
            on_decision=self.metrics.decision,
        )  # fmt: skip
        self.interval_s = float(settings["interval_s"])
        self.lock = threading.Lock()
        self.started_at = time.time()
        with self.lock:
            self.ctl.load()  # resumes from the records (after a restart: the same stage)
            self.metrics.snapshot(self.ctl.status())
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.tick_now()
            except Exception:  # a tick that fails is logged and retried at the next one
                logger.exception("rollout tick failed")

    def tick_now(self) -> list[dict[str, Any]]:
        with self.lock:
            decisions = self.ctl.tick()
            self.metrics.snapshot(self.ctl.status())
        return [d.model_dump() for d in decisions]

    def status(self) -> dict[str, Any]:
        with self.lock:
            return self.ctl.status() | {"actor_started_at": self.started_at}

    def pid(self) -> int:
        import os

        return os.getpid()


def start(settings: dict[str, Any]) -> ray.actor.ActorHandle:
    """Create the experiment's controller actor (refused if one runs already)."""
    name = actor_name(settings["experiment"])
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise RuntimeError(f"a rollout controller {name!r} is already running; stop it first")
    return RolloutActor.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(settings)


def stop(experiment_id: str) -> bool:
    try:
        handle = ray.get_actor(actor_name(experiment_id), namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


def settings_from(a: argparse.Namespace) -> dict[str, Any]:
    plan = load_plan(a.plan)
    if bool(a.registry) != bool(a.model):
        raise ValueError("--registry and --model go together (promotion moves <registry>/<model>@production)")
    return {
        "plan": plan.model_dump(), "log": a.log, "experiment": a.experiment, "dashboard": a.dashboard,
        "app": a.app, "registry": a.registry, "model": a.model, "interval_s": a.interval,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.serving.rollout_actor", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the controller actor of one experiment")
    s.add_argument("--plan", required=True, help="a RolloutPlan YAML (configs/rollouts/)")
    s.add_argument("--log", required=True, help="the event log URI the Routers write (absolute path or s3://)")
    s.add_argument("--experiment", required=True, help="the Router's experiment_salt")
    s.add_argument("--dashboard", default="http://127.0.0.1:8265", help="Ray dashboard (Serve REST API)")
    s.add_argument("--app", default="rerank", help="the Serve application whose Router is ramped")
    s.add_argument("--registry", help="registry URI; with --model, promotion moves production to candidate")
    s.add_argument("--model")
    s.add_argument("--interval", type=float, default=60.0, help="seconds between ticks")
    t = sub.add_parser("stop", help="stop (kill, no restart) an experiment's controller actor")
    t.add_argument("--experiment", required=True)
    for q in (s, t):
        q.add_argument("--address", default="auto", help="Ray cluster address")
    a = p.parse_args(argv)
    try:
        ray.init(address=a.address, namespace=NAMESPACE, log_to_driver=False)
        if a.cmd == "stop":
            print("stopped" if stop(a.experiment) else f"no controller for {a.experiment!r}")
            return 0
        handle = start(settings_from(a))
        doc = ray.get(handle.status.remote(), timeout=120)
        print(f"controller {actor_name(a.experiment)}: {doc['state']} at stage {doc['stage']['name']!r}")
        return 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
