from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from factories import TINY_SPEC, tiny_record

from cotrr_ray.core.features import CandidateList
from cotrr_ray.core.metrics import ndcg_at_k
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.data.readers import DataError, read_jsonl, read_letor
from cotrr_ray.data.splits import split_by_query, split_of
from cotrr_ray.data.synthetic import generate, generate_query

# --------------------------------------------------------------------------- JSONL


def _write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _read_error(path: Path, **kw) -> str:
    kw.setdefault("window", None)
    with pytest.raises(DataError) as info:
        read_jsonl(path, TINY_SPEC, **kw)
    return str(info.value)


def test_read_jsonl_valid_file(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "ok.jsonl", [tiny_record(query_id="q1"), "", tiny_record(3, query_id="q2")])
    lists = read_jsonl(p, TINY_SPEC, window=None)
    assert [cl.query_id for cl in lists] == ["q1", "q2"]
    assert [len(cl) for cl in lists] == [4, 3]
    assert all(cl.labels is not None for cl in lists)


def test_read_jsonl_feature_error_names_file_line_query_and_field(tmp_path: Path) -> None:
    bad = tiny_record(query_id="q2")
    bad["candidates"][1]["features"]["b"] = [1.0, 2.0, 3.0]
    p = _write_jsonl(tmp_path / "bad.jsonl", [tiny_record(query_id="q1"), "", bad])
    msg = _read_error(p)
    assert msg.startswith(f"{p}:3: ")  # blank line 2 still counts as a line
    assert "query 'q2'" in msg and "candidates[1].features.b" in msg and "expected dimension 2, got 3" in msg


@pytest.mark.parametrize(
    "mutate, field, fragment",
    [
        (lambda d: d["candidates"][1].update(upstream_score="abc"), "candidates[1].upstream_score", "valid number"),
        (lambda d: d["candidates"][0]["features"]["a"].__setitem__(1, "x"), "candidates[0].features.a[1]", "number"),
        (lambda d: d["candidates"][2].update(label=-1), "candidates[2].label", "greater than or equal to 0"),
        (lambda d: d["candidates"][2].update(colour="red"), "candidates[2].colour", "Extra inputs"),
        (lambda d: d.update(candidates=[]), "candidates", "at least 1 item"),
        (lambda d: d["candidates"][3].update(id=""), "candidates[3].id", "at least 1 character"),
    ],
)
def test_read_jsonl_schema_error_names_file_line_query_and_field(tmp_path: Path, mutate, field, fragment) -> None:
    bad = tiny_record(query_id="q2")
    mutate(bad)
    p = _write_jsonl(tmp_path / "bad.jsonl", [tiny_record(query_id="q1"), bad])
    msg = _read_error(p)
    assert msg.startswith(f"{p}:2: query 'q2', {field}: "), msg
    assert fragment in msg


def test_read_jsonl_missing_label_and_missing_window_features(tmp_path: Path) -> None:
    bad = tiny_record(query_id="q1")
    del bad["candidates"][2]["label"]
    msg = _read_error(_write_jsonl(tmp_path / "a.jsonl", [bad]))
    assert "a.jsonl:1:" in msg and "candidates[2].label" in msg and "missing label" in msg
    short = tiny_record(query_id="q1")
    short["candidates"][3]["features"] = None
    p = _write_jsonl(tmp_path / "b.jsonl", [short])
    assert "candidates[3].features.a: missing feature group" in _read_error(p, window=4)
    assert len(read_jsonl(p, TINY_SPEC, window=3)[0]) == 4  # outside the window: fine


@pytest.mark.parametrize("line", ["{bad json", '{"id": "q2", "candidates": [{"id": "c", "upstream_score": NaN}]}'])
def test_read_jsonl_invalid_json(tmp_path: Path, line: str) -> None:
    p = _write_jsonl(tmp_path / "bad.jsonl", [tiny_record(query_id="q1"), line])
    msg = _read_error(p)
    assert msg.startswith(f"{p}:2: invalid JSON")


def test_read_jsonl_duplicate_query_id(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "dup.jsonl", [tiny_record(query_id="q1"), tiny_record(query_id="q2"), tiny_record(query_id="q1")]
    )
    msg = _read_error(p)
    assert f"{p}:3:" in msg and "'q1'" in msg and "line 1" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_jsonl_empty_file(tmp_path: Path, content: str) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    assert "no queries" in _read_error(p)


# --------------------------------------------------------------------------- LETOR

LETOR = """\
# a hand-written LETOR file: label qid:N index:value ... [# comment]
2 qid:7 1:0.5 3:2.0 # doc a
0 qid:7 2:1.0 3:5.0
1 qid:7 1:1.5 3:2.0 4:-0.25
0 qid:7 4:9

3 qid:9 3:1.0 4:-1
"""


def test_read_letor_parses_sparse_rows_and_orders_by_upstream(tmp_path: Path) -> None:
    p = tmp_path / "tiny.txt"
    p.write_text(LETOR)
    lists = read_letor(p, num_features=4, upstream_feature=3)
    assert [cl.query_id for cl in lists] == ["7", "9"]
    q7, q9 = lists
    # File rows of qid 7: r0 (f3=2), r1 (f3=5), r2 (f3=2), r3 (f3 absent = 0). Descending f3, ties in file order.
    assert q7.ids == ["7-1", "7-0", "7-2", "7-3"]
    np.testing.assert_array_equal(q7.upstream, np.float32([5.0, 2.0, 2.0, 0.0]))
    np.testing.assert_array_equal(q7.labels, np.float32([0, 2, 1, 0]))
    np.testing.assert_array_equal(
        q7.features["letor"],
        np.float32([[0, 1, 5, 0], [0.5, 0, 2, 0], [1.5, 0, 2, -0.25], [0, 0, 0, 9]]),
    )
    assert q7.window == 4 and q7.query_features == {}
    assert q9.ids == ["9-0"] and q9.labels.tolist() == [3.0]
    np.testing.assert_array_equal(q9.features["letor"], np.float32([[0, 0, 1, -1]]))


def test_read_letor_window_and_group(tmp_path: Path) -> None:
    p = tmp_path / "tiny.txt"
    p.write_text(LETOR)
    q7, q9 = read_letor(p, num_features=4, upstream_feature=3, window=2, group="g")
    assert q7.window == 2 and q7.features["g"].shape == (2, 4) and len(q7) == 4
    assert q9.window == 1 and q9.features["g"].shape == (1, 4)
    assert q7.upstream.shape == (4,) and q7.labels.shape == (4,)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("2 7 1:0.5", "qid"),
        ("x qid:1 1:0.5", "malformed"),
        ("2 qid:1 1=0.5", "malformed"),
        ("2 qid:1 1:abc", "malformed"),
        ("2", "malformed"),
        ("2 qid:1 5:1.0", "outside 1..4"),
        ("2 qid:1 0:1.0", "outside 1..4"),
        ("2 qid:1 1:nan", "non-finite"),
        ("-1 qid:1 1:0.5", "invalid label"),
    ],
)
def test_read_letor_rejects_malformed_lines(tmp_path: Path, line: str, fragment: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text("1 qid:1 1:0.5 2:1\n# comment\n" + line + "\n")
    with pytest.raises(DataError) as info:
        read_letor(p, num_features=4, upstream_feature=2)
    msg = str(info.value)
    assert msg.startswith(f"{p}:3: ") and fragment in msg


def test_read_letor_refuses_a_query_that_is_not_contiguous(tmp_path: Path) -> None:
    p = tmp_path / "split.txt"
    p.write_text("1 qid:1 1:0.5\n0 qid:2 1:1\n# comment\n2 qid:1 2:1\n")
    with pytest.raises(DataError) as info:
        read_letor(p, num_features=4, upstream_feature=2)
    assert str(info.value).startswith(f"{p}:4: query '1' is not contiguous: its rows began on line 1")


def test_read_letor_empty_and_bad_upstream_feature(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_letor(p, num_features=4, upstream_feature=2)
    with pytest.raises(ValueError, match="upstream_feature"):
        read_letor(p, num_features=4, upstream_feature=5)


# --------------------------------------------------------------------------- splits

FRACTIONS = {"train": 0.7, "validation": 0.1, "calibration": 0.1, "test": 0.1}


def _stub(qid: str) -> CandidateList:
    return CandidateList(qid, [], np.zeros(0, np.float32), 0, {}, {}, None)


@pytest.fixture(scope="module")
def many_lists() -> list[CandidateList]:
    return [_stub(f"query-{i}") for i in range(5000)]


def _assignment(splits: dict[str, list[CandidateList]]) -> dict[str, str]:
    return {cl.query_id: name for name, ls in splits.items() for cl in ls}


def test_split_by_query_disjoint_complete_and_proportional(many_lists) -> None:
    splits = split_by_query(many_lists, FRACTIONS)
    assert list(splits) == list(FRACTIONS)
    ids = [cl.query_id for ls in splits.values() for cl in ls]
    assert len(ids) == len(set(ids)) == 5000  # every query in exactly one split
    for name, frac in FRACTIONS.items():
        # Binomial sd at n=5000 is <= 0.0065; 0.03 is > 4.5 sd.
        assert abs(len(splits[name]) / 5000 - frac) < 0.03, (name, len(splits[name]))


def test_split_by_query_deterministic_and_salted(many_lists) -> None:
    a = _assignment(split_by_query(many_lists, FRACTIONS))
    b = _assignment(split_by_query(list(reversed(many_lists)), FRACTIONS))
    assert a == b  # a function of the id only, not of order or call
    assert all(split_of(q, FRACTIONS) == s for q, s in list(a.items())[:200])
    c = _assignment(split_by_query(many_lists, FRACTIONS, salt="another-salt"))
    moved = sum(a[q] != c[q] for q in a)
    # Independent draws would disagree on 1 - (0.49 + 3 * 0.01) = 48% of queries.
    assert 0.35 * 5000 < moved < 0.6 * 5000


def test_split_by_query_rejects_bad_fractions(many_lists) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_query(many_lists[:10], {"train": 0.8, "test": 0.1})


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = dict(queries=12, min_candidates=5, max_candidates=9, top_m=4, progress=False)
    a = generate(tmp_path / "a.jsonl", seed=3, **kw).read_bytes()
    b = generate(tmp_path / "b.jsonl", seed=3, **kw).read_bytes()
    c = generate(tmp_path / "c.jsonl", seed=4, **kw).read_bytes()
    assert a == b
    assert a != c
    assert len(a.splitlines()) == 12


def test_generator_respects_top_m_and_validates(tmp_path: Path) -> None:
    p = generate(tmp_path / "g.jsonl", queries=15, seed=1, min_candidates=6, max_candidates=10, top_m=5, progress=False)
    for line in p.read_bytes().splitlines():
        rec = orjson.loads(line)
        cands = rec["candidates"]
        assert 6 <= len(cands) <= 10
        assert set(rec["features"]) == {"text_embedding"}
        for rank, c in enumerate(cands):
            if rank < 5:
                assert set(c["features"]) == set(IMAGE_SEARCH_SPEC.candidate)
            else:
                assert "features" not in c  # the tail carries ids, scores and labels only
            assert c["label"] in (0.0, 1.0, 2.0, 3.0, 4.0)
        up = [c["upstream_score"] for c in cands]
        assert up == sorted(up, reverse=True)  # listed in upstream order
    lists = read_jsonl(p, IMAGE_SEARCH_SPEC, window=5)
    assert len(lists) == 15 and all(cl.window == 5 for cl in lists)
    with pytest.raises(DataError, match="missing feature group"):
        read_jsonl(p, IMAGE_SEARCH_SPEC, window=6)


def test_generator_list_encoding_matches_base64(tmp_path: Path) -> None:
    kw = dict(queries=3, seed=5, min_candidates=4, max_candidates=4, top_m=4, progress=False)
    a = read_jsonl(generate(tmp_path / "b64.jsonl", encoding="base64", **kw), IMAGE_SEARCH_SPEC, window=4)
    b = read_jsonl(generate(tmp_path / "list.jsonl", encoding="list", **kw), IMAGE_SEARCH_SPEC, window=4)
    for x, y in zip(a, b):
        assert x.ids == y.ids
        for g in IMAGE_SEARCH_SPEC.candidate:
            np.testing.assert_allclose(x.features[g], y.features[g], atol=1e-6)  # list encoding rounds to 6 places


def test_generator_planted_signal_oracle_beats_upstream_beats_random() -> None:
    rng = np.random.default_rng(0)
    shuffle = np.random.default_rng(1)
    oracle, upstream, random = [], [], []
    for k in range(200):
        rec = generate_query(rng, f"s{k}", n=int(rng.integers(20, 33)), top_m=20)
        y = np.array([c["label"] for c in rec["candidates"]])
        n = len(y)
        if ndcg_at_k(np.zeros(n), y, 10) is None:
            continue
        oracle.append(ndcg_at_k(y, y, 10))
        upstream.append(ndcg_at_k(-np.arange(n), y, 10))  # index 0 = upstream's first
        random.append(ndcg_at_k(shuffle.permutation(n).astype(float), y, 10))
    assert len(oracle) >= 150
    o, u, r = map(np.mean, (oracle, upstream, random))
    # Measured: oracle 1.00, upstream ~0.74, random ~0.33. Upstream is informative but far from perfect.
    assert o - u > 0.15, (o, u)
    assert u - r > 0.2, (u, r)
    assert 0.5 < u < 0.9
