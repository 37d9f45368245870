"""Deterministic A/B assignment of requests to the treatment or control arm.

Pure functions, no I/O: the router calls `decide` once per request and the exposure log records
the resulting `RoutingDecision`. The contract below is fixed so that other services (log joiners,
analysis notebooks, clients in other languages) can reproduce every assignment exactly.

Contract
--------
1. Unit: the request's ``unit_id`` (user or session id); if it is absent or the empty string,
   the request's query id is used instead.
2. Bucket: ``key = f"{salt}:{unit}"`` encoded as UTF-8, hashed with MurmurHash3 x86 32-bit,
   seed 0, read as an *unsigned* 32-bit integer; ``bucket = hash % 100 + 1`` (1..100).
   This is Unleash's ``normalizedHash``.
3. Arm: ``"treatment"`` iff ``bucket <= rollout_percentage``, else ``"control"``. So 0 assigns
   nobody, 100 assigns everybody, and raising the percentage only ever adds units to treatment.

Worked example (salt ``"rerank-v2"``, unit ``"user-42"``)::

    key    = "rerank-v2:user-42"
    hash   = murmur3_x86_32(key.encode("utf-8"), seed=0)  # 76515606 (unsigned)
    bucket = 76515606 % 100 + 1                           # 7
    arm    = "treatment" at rollout 10 (7 <= 10), "control" at rollout 5

Changing the salt reshuffles everyone independently, which is how a new experiment avoids
inheriting the previous one's split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mmh3

Arm = Literal["treatment", "control"]

__all__ = ["Arm", "RoutingDecision", "assign_arm", "bucket", "decide", "unit_for"]


def bucket(unit_id: str, salt: str) -> int:
    """Return the unit's bucket in 1..100 for this salt (MurmurHash3 x86_32, seed 0, unsigned)."""
    # Never the built-in hash(): it is randomised per process, so assignments would not be sticky.
    return mmh3.hash(f"{salt}:{unit_id}", 0, signed=False) % 100 + 1


def _check_rollout(rollout_percentage: float) -> None:
    # Written as a negated range check so NaN is rejected too.
    if not 0 <= rollout_percentage <= 100:
        raise ValueError(f"rollout_percentage must be in [0, 100], got {rollout_percentage!r}")


def assign_arm(unit_id: str, *, salt: str, rollout_percentage: float) -> Arm:
    """Return ``"treatment"`` iff ``bucket(unit_id, salt) <= rollout_percentage``.

    Raises ValueError unless ``0 <= rollout_percentage <= 100``.
    """
    _check_rollout(rollout_percentage)
    return "treatment" if bucket(unit_id, salt) <= rollout_percentage else "control"


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
    _check_rollout(rollout_percentage)
    unit = unit_for(unit_id, query_id)
    b = bucket(unit, salt)
    return RoutingDecision(unit=unit, bucket=b, arm="treatment" if b <= rollout_percentage else "control")
