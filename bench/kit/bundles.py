"""Bundle copies for a run and deliberately broken bundles."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kit.machine import say

REPO = Path(__file__).resolve().parents[2]


def prepare_bundle(requested: str | None, workdir: Path) -> Path:
    """Copy the bundle (a directory or a registry URI/alias) to `workdir`, so nothing changes it mid-run;
    build a tiny one if there is none."""
    from cotrr_ray.bundles.registry import BundleSource

    requested = requested or str(REPO / "artifacts/registry/demo@production")
    dst = workdir / "bundle"
    try:
        src = BundleSource.parse(requested).resolve()[1]
    except Exception as e:  # no registry, alias or bundle there: say why, then build one
        say(f"no bundle at {requested} ({e})")
        src = None
    if src is not None and (src / "manifest.json").exists():
        shutil.copytree(src, dst)
        return dst
    say("building a tiny bundle (tests/_bundles.py)")
    sys.path.insert(0, str(REPO / "tests"))
    from _bundles import make_bundle, make_data

    return make_bundle(dst, make_data(workdir / "lists.jsonl"), seed=0, steps=30)
