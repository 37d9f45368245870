"""Deterministic A/B assignment of requests to the treatment or control arm.

Pure functions, no I/O: the router calls `decide` once per request and the exposure log records
the resulting `RoutingDecision`. The contract below is fixed so that other services (log joiners,
analysis notebooks, clients in other languages) can reproduce every assignment exactly.

Contract
--------
1. Unit: the request's ``unit_id`` (user or session id); if it is absent or the empty string,
   the request's query id is used instead.
2. Bucket: ``key = f"{salt}:{unit}"`` encoded as UTF-8, hashed with MurmurHash3 x86 32-bit,
   seed 0, read as an *unsigned* 32-bit integer; ``bucket = hash % 10000 + 1`` (1..10000, one
   bucket per basis point). This is Unleash's ``normalizedHash`` with a normaliser of 10000.
3. Arm: ``"treatment"`` iff ``bucket <= round(rollout_percentage * 100)``, else ``"control"``.
   ``rollout_percentage`` is in [0, 100] and a multiple of 0.01 (anything finer is refused, so the
   logged percentage is always the assigned share). So 0 assigns nobody, 0.01 one unit in 10000,
   100 everybody, and raising the percentage only ever adds units to treatment.

Worked example (salt ``"rerank-v2"``, unit ``"user-42"``)::

    key    = "rerank-v2:user-42"
    hash   = murmur3_x86_32(key.encode("utf-8"), seed=0)  # 76515606 (unsigned)
    bucket = 76515606 % 10000 + 1                         # 5607
    arm    = "treatment" at rollout 60 (5607 <= 6000) and at 56.07 (5607 <= 5607),
             "control" at rollout 56.06 (5607 > 5606) and at 10

Changing the salt reshuffles everyone independently, which is how a new experiment avoids
inheriting the previous one's split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mmh3

Arm = Literal["treatment", "control"]

__all__ = ["BUCKETS", "Arm", "RoutingDecision", "assign_arm", "bucket", "decide", "unit_for"]


BUCKETS = 10_000  # basis points: the finest rollout step is 0.01 %


def bucket(unit_id: str, salt: str) -> int:
    """Return the unit's bucket in 1..10000 for this salt (MurmurHash3 x86_32, seed 0, unsigned)."""
    # Never the built-in hash(): it is randomised per process, so assignments would not be sticky.
    return mmh3.hash(f"{salt}:{unit_id}", 0, signed=False) % BUCKETS + 1


def _threshold(rollout_percentage: float) -> int:
    """The last treatment bucket of a rollout percentage; ValueError for one the buckets cannot express."""
    # Written as a negated range check so NaN is rejected too.
    if not 0 <= rollout_percentage <= 100:
        raise ValueError(f"rollout_percentage must be in [0, 100], got {rollout_percentage!r}")
    # 0.07 * 100 is 7.000000000000001: compare with a tolerance, then round.
    basis_points = rollout_percentage * BUCKETS / 100
    if abs(basis_points - round(basis_points)) > 1e-6:
        raise ValueError(
            f"rollout_percentage must be a multiple of 0.01 (buckets are basis points), got {rollout_percentage!r}"
        )
    return round(basis_points)


def assign_arm(unit_id: str, *, salt: str, rollout_percentage: float) -> Arm:
    """Return ``"treatment"`` iff ``bucket(unit_id, salt) <= round(rollout_percentage * 100)``.

    Raises ValueError unless ``0 <= rollout_percentage <= 100`` and it is a multiple of 0.01.
    """
    return "treatment" if bucket(unit_id, salt) <= _threshold(rollout_percentage) else "control"


def unit_for(unit_id: str | None, query_id: str) -> str:
    """Return the assignment unit: ``unit_id`` unless it is None or empty, else ``query_id``."""
    return unit_id if unit_id else query_id


@dataclass(frozen=True)
class RoutingDecision:
    """One request's assignment, as recorded in the exposure log."""

    unit: str
    bucket: int
    arm: Arm


def decide(unit_id: str | None, query_id: str, *, salt: str, rollout_percentage: float) -> RoutingDecision:
    """Resolve the unit, hash it once and assign an arm (the router's per-request entry point)."""
    threshold = _threshold(rollout_percentage)
    unit = unit_for(unit_id, query_id)
    b = bucket(unit, salt)
    return RoutingDecision(unit=unit, bucket=b, arm="treatment" if b <= threshold else "control")
