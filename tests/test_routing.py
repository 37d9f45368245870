"""Tests for deterministic A/B routing (cotrr_ray.experiments.assignment)."""

from __future__ import annotations

import math

import pytest

from cotrr_ray.experiments.assignment import BUCKETS, RoutingDecision, assign_arm, bucket, decide, unit_for

N_UNITS = 20_000
UNITS = [f"user-{i}" for i in range(N_UNITS)]

# (salt, unit_id, unsigned murmur3 of f"{salt}:{unit_id}", bucket). Hard-coded so a library or
# contract change shows up as a failure rather than silently re-bucketing live traffic.
GOLDEN = [
    ("rerank-v2", "user-42", 76515606, 5607),
    ("rerank-v2", "user-43", 903944133, 4134),
    ("rerank-v2", "session-abc123", 1950009149, 9150),
    ("", "user-42", 3362924191, 4192),
    ("exp-2024", "q_000017", 706180657, 658),
    ("rerank-v2", "用户-ünïcødé-🙂", 3983848532, 8533),
    ("exp-2024", "user-42", 525732264, 2265),
    ("s", "", 1046795059, 5060),
]


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """Reference MurmurHash3 x86_32 (Austin Appleby's C code), unsigned result."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed & mask
    n_blocks = len(data) // 4
    for i in range(n_blocks):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = rotl((k * c1) & mask, 15)
        h ^= (k * c2) & mask
        h = (rotl(h, 13) * 5 + 0xE6546B64) & mask

    tail = data[4 * n_blocks :]
    if tail:
        k = int.from_bytes(tail, "little")
        k = rotl((k * c1) & mask, 15)
        h ^= (k * c2) & mask

    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def test_reference_matches_published_vectors() -> None:
    # Well-known MurmurHash3_x86_32 test vectors, so the reference itself is trustworthy.
    assert murmur3_x86_32(b"", 0) == 0
    assert murmur3_x86_32(b"", 1) == 0x514E28B7
    assert murmur3_x86_32(b"Hello, world!", 1234) == 0xFAF6CDB3
    assert murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0) == 0x2E4FF723


@pytest.mark.parametrize(("salt", "unit_id", "hashed", "expected"), GOLDEN)
def test_golden_buckets(salt: str, unit_id: str, hashed: int, expected: int) -> None:
    assert bucket(unit_id, salt) == expected


@pytest.mark.parametrize(("salt", "unit_id", "hashed", "expected"), GOLDEN)
def test_golden_vectors_match_reference_implementation(salt: str, unit_id: str, hashed: int, expected: int) -> None:
    # Independent of mmh3: the golden values follow from the written contract alone.
    h = murmur3_x86_32(f"{salt}:{unit_id}".encode(), 0)
    assert h == hashed
    assert h % 10000 + 1 == expected


def test_worked_example_from_docstring() -> None:
    assert bucket("user-42", "rerank-v2") == 5607
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=60) == "treatment"
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=56.07) == "treatment"
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=56.06) == "control"
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=10) == "control"


def test_bucket_range() -> None:
    # 200,000 units: every one of the 10,000 buckets is hit (a bucket missed has odds ~e^-20).
    buckets = {bucket(f"unit-{i}", "range") for i in range(200_000)}
    assert BUCKETS == 10_000
    assert buckets == set(range(1, 10_001))


@pytest.mark.parametrize("rollout", [5, 20, 50])
def test_treatment_share_matches_rollout(rollout: float) -> None:
    share = sum(assign_arm(u, salt="exp-prop", rollout_percentage=rollout) == "treatment" for u in UNITS)
    assert abs(100 * share / N_UNITS - rollout) <= 1.5


def test_monotonic_in_rollout() -> None:
    at20 = {u for u in UNITS if assign_arm(u, salt="exp-mono", rollout_percentage=20) == "treatment"}
    at50 = {u for u in UNITS if assign_arm(u, salt="exp-mono", rollout_percentage=50) == "treatment"}
    assert at20 and at20 <= at50
    assert len(at50) > len(at20)


def test_zero_and_full_rollout() -> None:
    assert all(assign_arm(u, salt="edge", rollout_percentage=0) == "control" for u in UNITS)
    assert all(assign_arm(u, salt="edge", rollout_percentage=100) == "treatment" for u in UNITS)


def test_fractional_rollout_uses_bucket_threshold() -> None:
    # bucket 5607 is in at 56.07 and 56.5, out at 56.06.
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=56.5) == "treatment"
    assert assign_arm("user-42", salt="rerank-v2", rollout_percentage=56.06) == "control"


@pytest.mark.parametrize("rollout", [0.5, 0.07, 2.25])
def test_sub_percent_rollouts_assign_the_share_they_log(rollout: float) -> None:
    # With whole-percent buckets 0.5 assigned nobody while the exposure log recorded 0.5.
    units = [f"unit-{i}" for i in range(200_000)]
    share = sum(assign_arm(u, salt="exp-sub", rollout_percentage=rollout) == "treatment" for u in units)
    assert share > 0
    assert abs(100 * share / len(units) - rollout) <= max(0.1 * rollout, 0.02)


def test_sticky_across_calls() -> None:
    for u in UNITS[:500]:
        arms = {assign_arm(u, salt="sticky", rollout_percentage=50) for _ in range(3)}
        assert len(arms) == 1


def test_different_salts_are_independent() -> None:
    a = [assign_arm(u, salt="exp-a", rollout_percentage=50) for u in UNITS]
    b = [assign_arm(u, salt="exp-b", rollout_percentage=50) for u in UNITS]
    agreement = sum(x == y for x, y in zip(a, b)) / N_UNITS
    assert 0.45 <= agreement <= 0.55


def test_unit_for_falls_back_to_query_id() -> None:
    assert unit_for("user-1", "q-1") == "user-1"
    assert unit_for(None, "q-1") == "q-1"
    assert unit_for("", "q-1") == "q-1"


def test_decide_combines_fallback_bucket_and_arm() -> None:
    d = decide("user-42", "q-9", salt="rerank-v2", rollout_percentage=60)
    assert d == RoutingDecision(unit="user-42", bucket=5607, arm="treatment")

    fallback = decide(None, "user-42", salt="rerank-v2", rollout_percentage=50)
    assert fallback == RoutingDecision(unit="user-42", bucket=5607, arm="control")
    assert decide("", "user-42", salt="rerank-v2", rollout_percentage=50) == fallback


def test_decision_is_frozen() -> None:
    d = decide("u", "q", salt="s", rollout_percentage=50)
    with pytest.raises(AttributeError):
        d.arm = "control"  # type: ignore[misc]


@pytest.mark.parametrize("rollout", [-0.1, 100.1, -1, 101, math.nan, math.inf])
def test_invalid_rollout_raises(rollout: float) -> None:
    with pytest.raises(ValueError):
        assign_arm("u", salt="s", rollout_percentage=rollout)
    with pytest.raises(ValueError):
        decide("u", "q", salt="s", rollout_percentage=rollout)


@pytest.mark.parametrize("rollout", [0.005, 12.345, 99.999, 0.0001])
def test_rollout_finer_than_a_basis_point_raises(rollout: float) -> None:
    with pytest.raises(ValueError, match="multiple of 0.01"):
        assign_arm("u", salt="s", rollout_percentage=rollout)
    with pytest.raises(ValueError, match="multiple of 0.01"):
        decide("u", "q", salt="s", rollout_percentage=rollout)


@pytest.mark.parametrize("rollout", [0, 0.01, 0.07, 0.5, 33.33, 99.99, 100])
def test_rollouts_in_basis_points_are_accepted(rollout: float) -> None:
    decide("u", "q", salt="s", rollout_percentage=rollout)
