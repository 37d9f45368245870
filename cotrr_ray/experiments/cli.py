"""`python -m cotrr_ray.experiments`: experiment reports from the event log.

    python -m cotrr_ray.experiments report --log artifacts/events --experiment rerank-v1 \
        [--json OUT.json] [--png-dir DIR] [--alpha 0.05] [--looks 20] [--set tau_preference=0.05]

The table goes to stdout; `--json` writes the whole report, `--png-dir` the plots (cumulative effect
with its confidence sequence for A/B and interleaving, SRM). The log may be a local directory or an
``s3://`` URI (AWS_ENDPOINT_URL etc. from the environment). Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

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
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
