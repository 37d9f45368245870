"""`python -m cotrr_ray.experiments`: experiment reports from the event log, and rollout operator controls.

    python -m cotrr_ray.experiments report --log artifacts/events --experiment rerank-v1 \
        [--json OUT.json] [--png-dir DIR] [--alpha 0.05] [--looks 20] [--set tau_preference=0.05]
    python -m cotrr_ray.experiments status --log artifacts/events [--experiment rerank-v1] [--json]
    python -m cotrr_ray.experiments pause|resume|abort --log artifacts/events --experiment rerank-v1 \
        --operator ann [--reason "..."]
    python -m cotrr_ray.experiments force --log ... --experiment rerank-v1 --stage 5% --operator ann

`report`: the table goes to stdout; `--json` writes the whole report, `--png-dir` the plots
(cumulative effect with its confidence sequence for A/B and interleaving, SRM). `status`: the rollout
controller's status (all experiments without `--experiment`). `pause`/`resume`/`abort`/`force` queue
an operator command beside the log; the controller applies it at its next tick (a command that
cannot apply to the current state is refused here, with the reason, exit 2). The controller itself
runs as a Ray actor: ``python -m cotrr_ray.serving.rollout_actor``. The log may be a local directory
or an ``s3://`` URI (AWS_ENDPOINT_URL etc. from the environment). Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from cotrr_ray.experiments import controller as C
from cotrr_ray.experiments.report import ReportSettings, experiment_report, format_report, plot_report


def _settings(pairs: list[str], alpha: float | None, looks: int | None) -> ReportSettings:
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected key=value")
        values[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    if alpha is not None:
        values["alpha"] = alpha
    if looks is not None:
        values["looks"] = looks
    return ReportSettings(**values)


def _report(a: argparse.Namespace) -> int:
    try:
        report = experiment_report(a.log, a.experiment, _settings(a.set, a.alpha, a.looks))
    except (ValueError, ValidationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is None:
        print(f"error: no decision of experiment {a.experiment!r} in {a.log}", file=sys.stderr)
        return 2
    print(format_report(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2, default=str))
    if a.png_dir:
        for path in plot_report(report, a.png_dir):
            print(f"wrote {path}")
    return 0


def format_status(doc: dict) -> str:
    st = doc["stage"]
    lines = [
        f"experiment {doc['experiment_id']}: {doc['state']} at stage {st['index']} {st['name']!r} ({st['mode']}, "
        f"{st['rollout_percentage']:g}%), plan {doc['plan']['name']!r}"
    ]
    for g in doc["guardrails"]:
        lines.append(f"  guardrail {g['name']:<24} {g['status']:<18} {g['detail']}")
    for d in doc["decisions"][-10:]:
        lines.append(
            f"  #{d['seq']:<4} {d['action']:<9} {d['from_stage']} -> {d['to_stage']} by {d['actor']}: {d['reason']}"
        )
    if doc.get("last_error"):
        lines.append(f"  last error: {doc['last_error']}")
    return "\n".join(lines)


def _status(a: argparse.Namespace) -> int:
    if a.experiment is None:
        listed = C.experiments(a.log)
        print(json.dumps(listed, indent=2) if a.json else "\n".join(
            f"{e['experiment_id']:<32} {e['state']:<12} {e['stage']['name']}" for e in listed
        ) or "no experiment with a controller under this log")  # fmt: skip
        return 0
    doc = C.Store(a.log, a.experiment).read_status()
    if doc is None:
        print(f"error: no controller status for {a.experiment!r} under {a.log}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if a.json else format_status(doc))
    return 0


def _command(a: argparse.Namespace) -> int:
    cmd = C.new_command(a.cmd, stage=getattr(a, "stage", None), reason=a.reason, actor=f"operator:{a.operator}")
    why = C.submit_command(a.log, a.experiment, cmd)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    print(f"queued {a.cmd} ({cmd.id}); the controller applies it at its next tick")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="per-arm metrics, SRM, sequential tests, interleaving")
    r.add_argument("--log", required=True, help="event log root (local directory or s3://...)")
    r.add_argument("--experiment", required=True, help="the experiment id: the routing config's experiment_salt")
    r.add_argument("--json", type=Path, help="write the whole report here")
    r.add_argument("--png-dir", type=Path, help="write the plots here")
    r.add_argument("--alpha", type=float)
    r.add_argument("--looks", type=int)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a ReportSettings field")
    s = sub.add_parser("status", help="the rollout controller's status")
    s.add_argument("--log", required=True)
    s.add_argument("--experiment", help="one experiment (default: list them all)")
    s.add_argument("--json", action="store_true", help="the whole status document")
    for action in ("pause", "resume", "abort", "force"):
        c = sub.add_parser(action, help=f"{action} a rollout (queued for the controller)")
        c.add_argument("--log", required=True)
        c.add_argument("--experiment", required=True)
        c.add_argument("--operator", required=True, help="your name, recorded with the decision")
        c.add_argument("--reason", default="", help="why, recorded with the decision")
        if action == "force":
            c.add_argument("--stage", required=True, help="the stage to go to")
    a = p.parse_args(argv)
    try:
        return {"report": _report, "status": _status}.get(a.cmd, _command)(a)
    except (ValueError, ValidationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
