"""Bundle copies for a run and deliberately broken bundles."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from kit.machine import say

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(src: Path, dst: Path, kind: str) -> Path:
    """A copy of bundle `src` made bad in one way:
    - corrupt: one byte of model.pt flipped (checksum mismatch);
    - missing: normalizer.json deleted (still listed in the manifest);
    - spec: an internally consistent bundle for another feature spec (version renamed, fingerprints
      and checksums updated), which loads fine but must not replace the served one."""
    from cotrr_ray.core.spec import FeatureSpec

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if kind == "corrupt":
        raw = bytearray((dst / "model.pt").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (dst / "model.pt").write_bytes(bytes(raw))
    elif kind == "missing":
        (dst / "normalizer.json").unlink()
    elif kind == "spec":
        spec = json.loads((dst / "feature_spec.json").read_text())
        spec["version"] = spec["version"] + "-other"
        fingerprint = FeatureSpec.model_validate(spec).fingerprint()
        (dst / "feature_spec.json").write_text(json.dumps(spec, indent=2))
        norm = json.loads((dst / "normalizer.json").read_text())
        norm["spec_fingerprint"] = fingerprint
        (dst / "normalizer.json").write_text(json.dumps(norm))
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["feature_spec_fingerprint"] = fingerprint
        manifest["bundle_id"] = manifest["bundle_id"] + "-otherspec"
        for name in ("feature_spec.json", "normalizer.json"):
            manifest["files"][name] = _sha(dst / name)
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    else:
        raise ValueError(kind)
    return dst


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
