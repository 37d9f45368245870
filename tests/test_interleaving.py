"""Team-draft interleaving: the merge rule, its balance, the reproducible coin, competitive rounds, credit."""

from __future__ import annotations

import itertools

import mmh3
import numpy as np
import pytest

from cotrr_ray.experiments.interleaving import CONTROL, TREATMENT, coin_treatment_first, credit, team_draft


def reference_team_draft(a: list[int], b: list[int], coins: list[bool], k: int) -> tuple[list[int], list[str]]:
    """The pseudocode of experiments.md, literally, with the coin of round r given as coins[r]."""
    merged, ta, tb = [], [], []
    while len(merged) < k and (set(a) | set(b)) - set(merged):
        a_left = [d for d in a if d not in merged]
        b_left = [d for d in b if d not in merged]
        pick_a = len(ta) < len(tb) or (len(ta) == len(tb) and coins[len(merged) // 2])
        if not a_left:
            pick_a = False
        if not b_left:
            pick_a = True
        d = (a_left if pick_a else b_left)[0]
        merged.append(d)
        (ta if pick_a else tb).append(d)
    return merged, [TREATMENT if d in ta else CONTROL for d in merged]


def random_rankings(rng: np.random.Generator, m: int) -> tuple[list[int], list[int]]:
    a = rng.permutation(m).tolist()
    b = rng.permutation(m).tolist()
    return a[: rng.integers(1, m + 1)], b[: rng.integers(1, m + 1)]


def test_matches_the_reference_pseudocode_on_random_rankings():
    rng = np.random.default_rng(0)
    for trial in range(300):
        a, b = random_rankings(rng, int(rng.integers(1, 12)))
        key, salt = f"req-{trial}", "exp-7"
        k = int(rng.integers(1, 15))
        coins = [coin_treatment_first(key, r, salt) for r in range(k)]
        got = team_draft(a, b, key=key, salt=salt, k=k)
        order, teams = reference_team_draft(a, b, coins, k)
        assert list(got.order) == order
        assert list(got.teams) == teams


def test_team_sizes_differ_by_at_most_one_at_every_prefix_while_both_rankings_last():
    rng = np.random.default_rng(1)
    for trial in range(200):
        m = int(rng.integers(2, 20))
        a, b = rng.permutation(m).tolist(), rng.permutation(m).tolist()  # full rankings: never exhausted early
        r = team_draft(a, b, key=f"q{trial}")
        assert sorted(r.order) == list(range(m))  # every item once
        n_t = np.cumsum([t == TREATMENT for t in r.teams])
        n_c = np.arange(1, m + 1) - n_t
        assert np.all(np.abs(n_t - n_c) <= 1)


def test_an_exhausted_captain_stops_picking():
    r = team_draft([0], [1, 2, 3, 4], key="k")
    assert r.order[:2] in ((0, 1), (1, 0))
    assert r.teams.count(TREATMENT) == 1 and len(r.order) == 5
    # Once treatment is exhausted nothing is contested any more.
    assert not any(r.competitive[2:])


def test_coin_is_murmur3_of_salt_key_round():
    for key, salt, rnd in [("req-1", "", 0), ("req-1", "s", 3), ("abc", "exp", 7)]:
        expected = mmh3.hash(f"{salt}:{key}:{rnd}", 0, signed=False) % 2 == 0
        assert coin_treatment_first(key, rnd, salt) is expected


def test_same_key_same_merge_and_different_keys_give_both_outcomes():
    a, b = [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]
    first = team_draft(a, b, key="req-42", salt="s")
    assert team_draft(a, b, key="req-42", salt="s") == first
    starters = {team_draft(a, b, key=f"req-{i}", salt="s").teams[0] for i in range(64)}
    assert starters == {TREATMENT, CONTROL}
    merges = {team_draft(a, b, key=f"req-{i}", salt="s").order for i in range(64)}
    assert len(merges) > 2  # later rounds' coins matter too
    # The salt reshuffles: the same keys under another salt do not give the same starters.
    s1 = [team_draft(a, b, key=f"req-{i}", salt="s").teams[0] for i in range(64)]
    s2 = [team_draft(a, b, key=f"req-{i}", salt="other").teams[0] for i in range(64)]
    assert s1 != s2


def test_identical_rankings_have_no_competitive_pick_and_show_the_ranking():
    for i in range(20):
        ranking = np.random.default_rng(i).permutation(10).tolist()
        r = team_draft(ranking, ranking, key=f"q{i}")
        assert list(r.order) == ranking
        assert not any(r.competitive)


def test_competitive_flags_per_round():
    # Round 0: captains want 0 and 1 (different) -> competitive. Then 0 and 1 are shown; both want 2
    # next -> round 1 not competitive; round 2: both want 3 (same) -> not competitive.
    r = team_draft([0, 2, 1, 3], [1, 2, 0, 3], key="x", k=4)
    assert set(r.order[:2]) == {0, 1}
    assert r.competitive == (True, True, False, False)


def test_k_truncates_and_rejects_bad_input():
    r = team_draft(list(range(10)), list(reversed(range(10))), key="q", k=3)
    assert len(r.order) == len(r.teams) == len(r.competitive) == 3
    with pytest.raises(ValueError):
        team_draft([0, 0, 1], [1, 0], key="q")
    with pytest.raises(ValueError):
        team_draft([0, 1], [1, 0], key="q", k=-1)


def test_credit_counts_clicks_per_team_with_and_without_competitive_only():
    teams = (TREATMENT, CONTROL, CONTROL, TREATMENT, TREATMENT)
    competitive = (True, True, False, False, True)
    assert credit(teams, competitive, [0, 1, 2, 3, 4], competitive_only=False) == (3, 2)
    assert credit(teams, competitive, [0, 1, 2, 3, 4]) == (2, 1)
    assert credit(teams, competitive, [2, 3]) == (0, 0)
    assert credit(teams, competitive, [0, 0, 0]) == (1, 0)  # one judgement per position
    assert credit(teams, competitive, []) == (0, 0)
    with pytest.raises(ValueError):
        credit(teams, competitive, [5])


def test_credit_of_every_click_subset_matches_a_direct_count():
    r = team_draft([3, 1, 4, 0, 2], [0, 1, 2, 3, 4], key="req-9")
    for n in range(len(r.order) + 1):
        for clicks in itertools.combinations(range(len(r.order)), n):
            for comp_only in (True, False):
                keep = [p for p in clicks if r.competitive[p] or not comp_only]
                expected = (sum(r.teams[p] == TREATMENT for p in keep), sum(r.teams[p] == CONTROL for p in keep))
                assert credit(r.teams, r.competitive, clicks, competitive_only=comp_only) == expected
