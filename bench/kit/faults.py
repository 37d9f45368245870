"""Fault injection: broken bundles and Serve replicas killed under load."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from kit.bodies import Body
from kit.cluster import kill_replica, replica_actors, running, wait_for
from kit.contract import LoadGen
from kit.load import summarize
from kit.machine import say


def kill_under_load(
    url: str,
    app: str,
    bodies: list[Body],
    deployment: str,
    *,
    kill_all: bool,
    concurrency: int,
    replace_timeout_s: float,
    settle_s: float = 3.0,
) -> dict[str, Any]:
    """Sustained load; `ray.kill` one (or every) replica actor of `deployment` after `settle_s`; keep
    the load on until Serve has replaced them (same count RUNNING, new actor names), then `settle_s`
    more. Returns counts for the whole run and for the outage (kill -> replaced)."""
    before = replica_actors(app, deployment)
    want = len(before)
    gen = LoadGen(url, bodies, concurrency=concurrency).start()
    time.sleep(settle_s)
    victims = before if kill_all else before[:1]
    t_kill = gen.now()
    for v in victims:
        kill_replica(v)
    say(f"  killed {len(victims)} {deployment} replica(s) at t={t_kill:.1f} s under concurrency {concurrency}")

    def replaced():
        now = replica_actors(app, deployment)
        return len(now) == want and not set(victims) & set(now) and running(app, deployment) == want and now

    try:
        after = wait_for(replaced, replace_timeout_s, 0.25, f"{deployment} replacement")
        t_replaced = gen.now()
    except TimeoutError:
        after, t_replaced = replica_actors(app, deployment), None
    time.sleep(settle_s)
    records = gen.stop()
    total = summarize(records)
    during = summarize(records, t_kill, t_replaced or float("inf"))
    return {
        "deployment": deployment,
        "killed": len(victims),
        "replicas": want,
        "kill_at_s": round(t_kill, 1),
        "replaced_after_s": None if t_replaced is None else round(t_replaced - t_kill, 1),
        "new_replicas": sorted(set(after) - set(before)),
        "total": total,
        "during_outage": during,
    }


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
