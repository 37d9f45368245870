"""Bundle copies for a run and deliberately broken bundles."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kit.machine import say

REPO = Path(__file__).resolve().parents[2]


def prepare_bundle(requested: str | None, workdir: Path) -> Path:
    """Copy the bundle to `workdir` (so nothing changes it mid-run); build a tiny one if missing."""
    src = Path(requested) if requested else REPO / "artifacts/bundles/demo"
    dst = workdir / "bundle"
    if (src / "manifest.json").exists():
        shutil.copytree(src, dst)
        return dst
    say(f"no bundle at {src}: building a tiny one (tests/_bundles.py)")
    sys.path.insert(0, str(REPO / "tests"))
    from _bundles import make_bundle, make_data

    return make_bundle(dst, make_data(workdir / "lists.jsonl"), seed=0, steps=30)
