"""Team-draft interleaving (Radlinski, Kurup, Joachims, CIKM 2008) with a reproducible coin.

The Router calls `team_draft` once per interleaved request with the two arms' rankings of the same
window and shows the merged `order`; the exposure log records `teams` and `competitive` per shown
position, and `credit` turns the clicks on that list into one preference (h_treatment, h_control).

Contract
--------
1. Rankings are sequences of distinct window indices (ints); they may be partial or hold different
   items, and the merge never shows an item twice.
2. Rounds: a round starts whenever both teams hold the same number of items (round r = 0, 1, ...,
   i.e. ``len(merged) // 2`` at that moment). The team with fewer items picks next; in a tie the coin
   of that round decides who picks first. A captain whose ranking is exhausted never picks; the other
   one picks alone until ``k`` items are shown or both are exhausted.
3. Coin: ``mmh3.hash(f"{salt}:{key}:{round}", 0, signed=False) & 1 == 0`` means the treatment
   captain picks first; ``key`` is the request id (MurmurHash3 x86 32-bit, seed 0, unsigned, UTF-8),
   the same hashing as the A/B bucket (`cotrr_ray.experiments.assignment.bucket`), so log joiners
   and other languages can replay every merge. Never Python's ``hash()``: it is randomised per
   process.
4. Competitive: at the start of a round each captain's candidate is its best item not yet shown; the
   round (both of its positions) is competitive iff both captains have one and they differ. When they
   coincide, whoever picks first takes the common item and the other team's pick is decided by the
   shared preference, so a click on either says nothing about which ranker is better (GrowthBook and
   Airbnb credit only competitive picks). A round where one captain is exhausted is not competitive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import mmh3

__all__ = ["CONTROL", "TREATMENT", "Interleaved", "coin_treatment_first", "credit", "team_draft"]

TREATMENT: Literal["treatment"] = "treatment"
CONTROL: Literal["control"] = "control"


@dataclass(frozen=True)
class Interleaved:
    """One merged list. All three tuples have one entry per shown position."""

    order: tuple[int, ...]  # merged ranking: indices into the window (0..m-1)
    teams: tuple[str, ...]  # per merged position: "treatment" or "control"
    competitive: tuple[bool, ...]  # per merged position: the two captains would have picked different items


def coin_treatment_first(key: str, round_: int, salt: str = "") -> bool:
    """The coin of one round: True iff the treatment captain picks first (contract point 3)."""
    return mmh3.hash(f"{salt}:{key}:{round_}", 0, signed=False) & 1 == 0


def _checked(ranking: Sequence[int], name: str) -> list[int]:
    items = [int(i) for i in ranking]
    if len(set(items)) != len(items):
        raise ValueError(f"{name} ranking repeats an item: {items}")
    if any(i < 0 for i in items):
        raise ValueError(f"{name} ranking holds a negative index: {items}")
    return items


class _Captain:
    """One team's ranking and a cursor past the items already shown (each item is skipped at most once)."""

    def __init__(self, ranking: list[int]) -> None:
        self.ranking = ranking
        self.cursor = 0

    def best(self, shown: set[int]) -> int | None:
        while self.cursor < len(self.ranking) and self.ranking[self.cursor] in shown:
            self.cursor += 1
        return self.ranking[self.cursor] if self.cursor < len(self.ranking) else None


def team_draft(
    treatment: Sequence[int], control: Sequence[int], *, key: str, salt: str = "", k: int | None = None
) -> Interleaved:
    """Merge two rankings by team draft; deterministic in (treatment, control, key, salt, k).

    ``k`` caps the merged length (default: every distinct item of both rankings).
    """
    cap_t, cap_c = _Captain(_checked(treatment, "treatment")), _Captain(_checked(control, "control"))
    limit = len(set(cap_t.ranking) | set(cap_c.ranking)) if k is None else k
    if limit < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order: list[int] = []
    teams: list[str] = []
    competitive: list[bool] = []
    shown: set[int] = set()
    n_t = n_c = 0
    round_competitive, round_start = False, 0
    while len(order) < limit:
        best_t, best_c = cap_t.best(shown), cap_c.best(shown)
        if best_t is None and best_c is None:
            break
        if n_t == n_c:  # a new round: is it contested, and who starts it?
            round_competitive = best_t is not None and best_c is not None and best_t != best_c
            round_start = len(order)
            pick_t = coin_treatment_first(key, len(order) // 2, salt)
        else:
            pick_t = n_t < n_c
        if best_t is None:
            pick_t = False
        elif best_c is None:
            pick_t = True
        item = best_t if pick_t else best_c
        # Once a captain is exhausted the counts never tie again: the other one's picks form no round.
        competitive.append(round_competitive and len(order) - round_start < 2)
        order.append(item)
        shown.add(item)
        teams.append(TREATMENT if pick_t else CONTROL)
        n_t, n_c = n_t + pick_t, n_c + (not pick_t)
    return Interleaved(tuple(order), tuple(teams), tuple(competitive))


def credit(
    teams: Sequence[str],
    competitive: Sequence[bool],
    clicked_positions: Sequence[int],
    competitive_only: bool = True,
) -> tuple[int, int]:
    """(h_treatment, h_control): clicks on each team's shown positions.

    ``clicked_positions`` are 0-based merged positions; a position clicked twice counts once (a
    double click is one judgement). With ``competitive_only`` (the default) clicks on
    non-competitive positions are dropped: both rankers would have shown those items there.
    """
    if len(teams) != len(competitive):
        raise ValueError(f"teams ({len(teams)}) and competitive ({len(competitive)}) differ in length")
    h_t = h_c = 0
    for pos in {int(p) for p in clicked_positions}:
        if not 0 <= pos < len(teams):
            raise ValueError(f"clicked position {pos} is outside the merged list of {len(teams)}")
        if competitive_only and not competitive[pos]:
            continue
        if teams[pos] == TREATMENT:
            h_t += 1
        elif teams[pos] == CONTROL:
            h_c += 1
        else:
            raise ValueError(f"unknown team {teams[pos]!r} at position {pos}")
    return h_t, h_c
