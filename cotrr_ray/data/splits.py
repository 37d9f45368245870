"""Query-level splits: a query never straddles two splits (MurmurHash3 of a salted query id)."""

from __future__ import annotations

from collections.abc import Iterable

import mmh3

from cotrr_ray.core.features import CandidateList

SPLITS = ("train", "validation", "calibration", "test")


def split_of(query_id: str, fractions: dict[str, float], salt: str = "cotrr-split") -> str:
    """Deterministic split by query id: MurmurHash3 (seed 0) of ``salt:query_id`` mapped to [0, 1)."""
    u = mmh3.hash(f"{salt}:{query_id}", 0, signed=False) / 2**32
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]  # float rounding at the top end


def split_by_query(
    lists: Iterable[CandidateList], fractions: dict[str, float], salt: str = "cotrr-split"
) -> dict[str, list[CandidateList]]:
    """Partition lists by query id; a query never straddles two splits."""
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    out: dict[str, list[CandidateList]] = {name: [] for name in fractions}
    for cl in lists:
        out[split_of(cl.query_id, fractions, salt)].append(cl)
    return out
