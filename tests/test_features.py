from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from factories import TINY_SPEC, b64, record, tiny_record

from cotrr_ray.core.features import (
    CONTEXT_FEATURES,
    FeatureNormalizer,
    Moments,
    RecordError,
    context_features,
    decode_vector,
    pad_lists,
    to_candidate_list,
)
from cotrr_ray.core.spec import FeatureSpec


def _error(d: dict, spec: FeatureSpec = TINY_SPEC, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        to_candidate_list(record(d), spec, **kw)
    return info.value


def _assert_names(err: RecordError, field: str, *fragments: str, query: str = "q1") -> None:
    """The error names the query, the exact field (JSON path incl. candidate index) and the problem."""
    assert err.query_id == query
    assert err.field == field
    text = str(err)
    assert repr(query) in text and field in text
    for f in fragments:
        assert f in text, text


# --------------------------------------------------------------------------- to_candidate_list


def test_valid_record_converts_to_arrays() -> None:
    d = tiny_record(4)
    cl = to_candidate_list(record(d), TINY_SPEC, require_labels=True)
    assert cl.query_id == "q1" and cl.ids == ["c0", "c1", "c2", "c3"] and len(cl) == 4
    assert cl.window == 4
    assert cl.features["a"].shape == (4, 3) and cl.features["a"].dtype == np.float32
    assert cl.features["b"].shape == (4, 2)
    np.testing.assert_array_equal(cl.features["a"][2], np.float32(d["candidates"][2]["features"]["a"]))
    np.testing.assert_array_equal(cl.query_features["q"], np.float32([0.25, -0.5]))
    np.testing.assert_array_equal(cl.upstream, np.float32([1.0, 0.9, 0.8, 0.7]))
    np.testing.assert_array_equal(cl.labels, np.float32([0, 1, 2, 0]))


def test_wrong_dimension_list() -> None:
    d = tiny_record()
    d["candidates"][2]["features"]["a"] = [1.0, 2.0]
    _assert_names(_error(d), "candidates[2].features.a", "expected dimension 3, got 2")


def test_wrong_dimension_base64() -> None:
    d = tiny_record()
    d["candidates"][1]["features"]["b"] = b64([1.0, 2.0, 3.0])
    _assert_names(_error(d), "candidates[1].features.b", "expected 2 float32 values (8 bytes), got 12 bytes")


def test_wrong_dimension_query_group() -> None:
    d = tiny_record()
    d["features"]["q"] = [1.0, 2.0, 3.0]
    _assert_names(_error(d), "query.features.q", "expected dimension 2, got 3")


def test_invalid_base64_rejected() -> None:
    d = tiny_record()
    d["candidates"][0]["features"]["a"] = "not base64!"
    _assert_names(_error(d), "candidates[0].features.a", "not valid base64")


def test_float32_overflow_rejected() -> None:
    # 1e39 is a finite JSON/float64 number (so pydantic lets it through) but overflows float32.
    d = tiny_record()
    d["candidates"][3]["features"]["a"] = [0.0, 1e39, 0.0]
    err = _error(d)
    _assert_names(err, "candidates[3].features.a", "non-finite value at position 1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_base64_rejected(bad: float) -> None:
    # base64 bypasses pydantic's allow_inf_nan=False, so decode_vector itself must catch it.
    d = tiny_record()
    d["candidates"][1]["features"]["b"] = b64([0.5, bad])
    _assert_names(_error(d), "candidates[1].features.b", "non-finite value at position 1")


def test_non_finite_query_feature_base64_rejected() -> None:
    d = tiny_record()
    d["features"]["q"] = b64([float("nan"), 1.0])
    _assert_names(_error(d), "query.features.q", "non-finite value at position 0")


def test_missing_candidate_group() -> None:
    d = tiny_record()
    del d["candidates"][2]["features"]["b"]
    _assert_names(_error(d), "candidates[2].features.b", "missing feature group")


def test_missing_query_group() -> None:
    d = tiny_record()
    d["features"] = {}
    _assert_names(_error(d), "query.features.q", "missing feature group")


def test_unknown_group() -> None:
    d = tiny_record()
    d["candidates"][1]["features"]["zz"] = [1.0]
    _assert_names(_error(d), "candidates[1].features.zz", "unknown feature group")
    d = tiny_record()
    d["features"]["extra"] = [1.0]
    _assert_names(_error(d), "query.features.extra", "unknown feature group")


def test_duplicate_candidate_id() -> None:
    d = tiny_record(5)
    d["candidates"][3]["id"] = "c1"
    _assert_names(_error(d), "candidates[3].id", "duplicate candidate id 'c1'")


def test_missing_label_when_required() -> None:
    d = tiny_record(labels=False)
    _assert_names(_error(d, require_labels=True), "candidates[0].label", "missing label")
    # Without labels at all and not required (serving): fine, labels is None.
    assert to_candidate_list(record(d), TINY_SPEC).labels is None


def test_partial_labels_rejected_even_when_not_required() -> None:
    d = tiny_record()
    del d["candidates"][2]["label"]
    _assert_names(_error(d), "candidates[2].label", "missing label")


def test_empty_list_rejected_by_schema() -> None:
    d = tiny_record()
    d["candidates"] = []
    with pytest.raises(ValueError, match="candidates"):
        record(d)


def test_features_past_window_are_ignored() -> None:
    d = tiny_record(6)
    d["candidates"][4]["features"] = None  # tail: no features at all
    d["candidates"][5]["features"] = {"a": [1.0], "zz": "garbage"}  # tail: would be invalid inside
    cl = to_candidate_list(record(d), TINY_SPEC, window=4, require_labels=True)
    assert cl.window == 4 and len(cl) == 6
    assert cl.features["a"].shape == (4, 3) and cl.features["b"].shape == (4, 2)
    assert cl.upstream.shape == (6,) and cl.labels.shape == (6,)
    assert cl.ids[4:] == ["c4", "c5"]


def test_missing_features_inside_window_rejected() -> None:
    d = tiny_record(6)
    d["candidates"][3]["features"] = None
    _assert_names(_error(d, window=4), "candidates[3].features.a", "missing feature group")
    # ... but the same record is fine with a window that stops before it.
    assert to_candidate_list(record(d), TINY_SPEC, window=3).window == 3


def test_window_longer_than_list_is_clipped() -> None:
    cl = to_candidate_list(record(tiny_record(3)), TINY_SPEC, window=10)
    assert cl.window == 3 and cl.features["a"].shape == (3, 3)


def test_base64_and_list_encodings_decode_identically() -> None:
    rng = np.random.default_rng(7)
    d_list = tiny_record(5, seed=3)
    for c in d_list["candidates"]:
        c["features"] = {"a": rng.standard_normal(3).tolist(), "b": (1e3 * rng.standard_normal(2)).tolist()}
    d_b64 = copy.deepcopy(d_list)
    for c in d_b64["candidates"]:
        c["features"] = {k: b64(v) for k, v in c["features"].items()}
    d_b64["features"] = {"q": b64(d_list["features"]["q"])}
    a = to_candidate_list(record(d_list), TINY_SPEC)
    b = to_candidate_list(record(d_b64), TINY_SPEC)
    for g in TINY_SPEC.candidate:
        assert a.features[g].dtype == b.features[g].dtype == np.float32
        np.testing.assert_array_equal(a.features[g], b.features[g])
    np.testing.assert_array_equal(a.query_features["q"], b.query_features["q"])


def test_decode_vector_direct() -> None:
    np.testing.assert_array_equal(decode_vector(b64([1, 2, 3]), 3, "x"), np.float32([1, 2, 3]))
    with pytest.raises(RecordError) as info:
        decode_vector([1.0, 2.0], 3, "some.field")
    assert info.value.field == "some.field" and info.value.query_id is None


# --------------------------------------------------------------------------- normaliser


def _lists(seed: int, n_lists: int = 5, spec: FeatureSpec = TINY_SPEC, scale: float = 1.0, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_lists):
        d = tiny_record(int(rng.integers(3, 7)), query_id=f"q{seed}-{k}", seed=seed * 100 + k)
        for c in d["candidates"]:
            c["features"] = {
                g: (shift + scale * rng.standard_normal(dim)).tolist() for g, dim in spec.candidate.items()
            }
            c["upstream_score"] = float(rng.normal(5.0, 2.0))
        d["features"] = {g: rng.standard_normal(dim).tolist() for g, dim in spec.query.items()}
        out.append(to_candidate_list(record(d), spec, window=4))
    return out


def test_normalizer_stats_come_from_the_given_lists_only() -> None:
    train = _lists(seed=1)
    other = _lists(seed=2, scale=10.0, shift=50.0)
    norm = FeatureNormalizer(TINY_SPEC).fit(train)
    x = np.concatenate([cl.features["a"] for cl in train]).astype(np.float64)
    mean, scale = norm.stats_["candidate.a"]
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scale, x.std(0), rtol=1e-6)
    q = np.stack([cl.query_features["q"] for cl in train]).astype(np.float64)
    np.testing.assert_allclose(norm.stats_["query.q"][0], q.mean(0), rtol=1e-6, atol=1e-6)
    # The upstream-score statistic uses the window only, never the tail.
    up = np.concatenate([cl.upstream[: cl.window] for cl in train]).astype(np.float64)
    np.testing.assert_allclose(norm.stats_["context.upstream_score"][0], [up.mean()], rtol=1e-6)
    # Standardised training features have mean 0 and std 1 per column.
    z = np.concatenate([norm.transform(cl)["candidate"]["a"] for cl in train])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-5)
    # Fitting on other data gives other statistics (what is fitted depends on the input).
    other_mean = FeatureNormalizer(TINY_SPEC).fit(other).stats_["candidate.a"][0]
    assert np.all(np.abs(other_mean - mean) > 10)


def test_moments_merge_exactly_over_any_partition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, size=(1000, 4))  # a large mean: a sum-of-squares formula would cancel
    cuts = sorted(rng.choice(np.arange(1, 1000), size=6, replace=False))
    parts = [Moments.of(p) for p in np.split(x, cuts)] + [Moments.of(np.zeros((0, 4)))]
    m = parts[0]
    for p in parts[1:]:
        m = m.merge(p)
    assert m.n == 1000
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(m.m2 / m.n, x.var(0), rtol=1e-9)


def test_normalizer_fit_from_merged_parts_equals_the_whole_fit() -> None:
    lists = _lists(seed=3)
    whole = FeatureNormalizer(TINY_SPEC).fit(lists)
    a = FeatureNormalizer(TINY_SPEC).moments(lists[:3], chunk=2)  # the parts two workers would send
    b = FeatureNormalizer(TINY_SPEC).moments(lists[3:], chunk=1)
    merged = FeatureNormalizer(TINY_SPEC).fit_moments({k: a[k].merge(b[k]) for k in a})
    for key, (mean, scale) in whole.stats_.items():
        np.testing.assert_allclose(merged.stats_[key][0], mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(merged.stats_[key][1], scale, rtol=1e-6)


def test_normalizer_fit_on_zero_lists_rejected() -> None:
    with pytest.raises(ValueError, match="zero lists"):
        FeatureNormalizer(TINY_SPEC).fit([])


def test_signed_log1p_and_none_transforms() -> None:
    spec = FeatureSpec(
        version="t2",
        candidate={"a": 3, "b": 2},
        query={"q": 2},
        transforms={"candidate.a": "signed_log1p_standardize", "candidate.b": "none"},
    )
    lists = _lists(seed=3, spec=spec, scale=100.0)
    norm = FeatureNormalizer(spec).fit(lists)
    x = np.concatenate([cl.features["a"] for cl in lists]).astype(np.float64)
    lx = np.sign(x) * np.log1p(np.abs(x))
    mean, scale = norm.stats_["candidate.a"]
    np.testing.assert_allclose(mean, lx.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, lx.std(0), rtol=1e-5)
    cl = lists[0]
    out = norm.transform(cl)
    raw = cl.features["a"].astype(np.float64)
    expected = (np.sign(raw) * np.log1p(np.abs(raw)) - mean) / scale
    np.testing.assert_allclose(out["candidate"]["a"], expected, rtol=1e-5, atol=1e-5)
    # Sign survives: negative raw values map below positive ones of the same magnitude.
    assert np.array_equal(np.sign(out["candidate"]["a"] * scale + mean), np.sign(raw))
    # 'none' is the identity.
    np.testing.assert_array_equal(out["candidate"]["b"], cl.features["b"])
    # The context's raw upstream column is standardised, the other two are untouched.
    m_up, s_up = norm.stats_["context.upstream_score"]
    np.testing.assert_allclose(out["context"][:, 0], (cl.upstream[: cl.window] - m_up) / s_up, rtol=1e-5)
    np.testing.assert_array_equal(out["context"][:, 1:], context_features(cl.upstream, cl.window)[:, 1:])


def test_constant_feature_does_not_blow_up() -> None:
    lists = _lists(seed=4)
    for cl in lists:
        cl.features["a"][:, 1] = 7.25
    norm = FeatureNormalizer(TINY_SPEC).fit(lists)
    assert norm.stats_["candidate.a"][1][1] == 1.0  # scale falls back to 1, not ~0
    z = np.concatenate([norm.transform(cl)["candidate"]["a"] for cl in lists])
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 1], 0.0, atol=1e-6)
    # A new value of a constant feature stays at a sane magnitude instead of exploding.
    probe = lists[0]
    probe.features["a"][0, 1] = 8.25
    assert abs(norm.transform(probe)["candidate"]["a"][0, 1] - 1.0) < 1e-5


def test_normalizer_round_trip_is_exact() -> None:
    lists = _lists(seed=5)
    norm = FeatureNormalizer(TINY_SPEC).fit(lists)
    state = json.loads(json.dumps(norm.to_dict()))  # what the bundle stores
    back = FeatureNormalizer.from_dict(state, TINY_SPEC)
    assert set(back.stats_) == set(norm.stats_)
    for k, (m, s) in norm.stats_.items():
        np.testing.assert_array_equal(back.stats_[k][0], m)
        np.testing.assert_array_equal(back.stats_[k][1], s)
    for cl in lists:
        a, b = norm.transform(cl), back.transform(cl)
        for g in TINY_SPEC.candidate:
            np.testing.assert_array_equal(a["candidate"][g], b["candidate"][g])
        np.testing.assert_array_equal(a["query"]["q"], b["query"]["q"])
        np.testing.assert_array_equal(a["context"], b["context"])


def test_normalizer_from_dict_rejects_other_spec() -> None:
    state = FeatureNormalizer(TINY_SPEC).fit(_lists(seed=6)).to_dict()
    other = FeatureSpec(version="tiny-v2", candidate=dict(TINY_SPEC.candidate), query=dict(TINY_SPEC.query))
    with pytest.raises(ValueError, match="different feature spec"):
        FeatureNormalizer.from_dict(state, other)


def _state() -> dict:
    return json.loads(json.dumps(FeatureNormalizer(TINY_SPEC).fit(_lists(seed=6)).to_dict()))


@pytest.mark.parametrize(
    "corrupt, fragment",
    [
        (lambda s: s.update(format_version=2), "format_version"),
        (lambda s: s["stats"].pop("candidate.b"), "lacks 'candidate.b' mean/scale"),
        (lambda s: s["stats"]["candidate.a"].update(scale=[1.0, 0.0, 1.0]), "non-positive scale"),
        (lambda s: s["stats"]["candidate.a"].update(scale=[1.0, -2.0, 1.0]), "non-positive scale"),
        (lambda s: s["stats"]["candidate.a"].update(mean=[1.0, float("nan"), 1.0]), "malformed"),
        (lambda s: s["stats"]["candidate.a"].update(mean=[1.0, 2.0]), "has shape"),
    ],
)
def test_normalizer_from_dict_rejects_malformed_state(corrupt, fragment) -> None:
    s = _state()
    corrupt(s)
    with pytest.raises(ValueError, match=fragment):
        FeatureNormalizer.from_dict(s, TINY_SPEC)


def test_normalizer_from_dict_rejects_state_of_wrong_dimension() -> None:
    s = _state()
    s["stats"]["candidate.a"] = {"mean": [0.0], "scale": [1.0]}  # group 'a' has 3 dims
    with pytest.raises(ValueError):
        FeatureNormalizer.from_dict(s, TINY_SPEC)


# --------------------------------------------------------------------------- padding and context


def test_pad_lists_masks_labels_and_zero_padding() -> None:
    lists = _lists(seed=8, n_lists=3)
    for cl, w in zip(lists, (1, 2, 4)):
        cl.window = w
        cl.features = {g: v[:w] for g, v in cl.features.items()}
    norm = FeatureNormalizer(TINY_SPEC).fit(lists)
    inputs = [norm.transform(cl) for cl in lists]
    p = pad_lists(inputs, TINY_SPEC, 5, labels=[cl.labels for cl in lists])
    assert len(p) == 3
    assert p.mask.dtype == bool and p.mask.shape == (3, 5)
    np.testing.assert_array_equal(p.mask.sum(1), [1, 2, 4])
    assert p.candidate["a"].shape == (3, 5, 3) and p.query["q"].shape == (3, 2)
    assert p.context.shape == (3, 5, len(CONTEXT_FEATURES))
    for i, cl in enumerate(lists):
        w = cl.window
        np.testing.assert_array_equal(p.labels[i, :w], cl.labels[:w])  # window labels only, not the tail
        assert (p.labels[i, w:] == 0).all()
        np.testing.assert_array_equal(p.candidate["a"][i, :w], inputs[i]["candidate"]["a"])
        assert (p.candidate["a"][i, w:] == 0).all() and (p.context[i, w:] == 0).all()
    sub = p.take(np.array([2, 0]))
    np.testing.assert_array_equal(sub.mask, p.mask[[2, 0]])
    np.testing.assert_array_equal(sub.labels, p.labels[[2, 0]])
    assert pad_lists(inputs, TINY_SPEC, 5).labels is None
    with pytest.raises(ValueError, match="more than M=3"):
        pad_lists(inputs, TINY_SPEC, 3)


def test_context_features_values() -> None:
    up = np.float32([3.0, 2.0, 1.0, 0.5, 10.0])
    ctx = context_features(up, 3)
    assert ctx.shape == (3, 3) and ctx.dtype == np.float32
    np.testing.assert_allclose(ctx[:, 0], [3, 2, 1])
    z = (np.array([3.0, 2.0, 1.0]) - 2.0) / (np.std([3.0, 2.0, 1.0]) + 1e-6)
    np.testing.assert_allclose(ctx[:, 1], z, rtol=1e-6)
    np.testing.assert_allclose(ctx[:, 2], [1.0, 1 / 2, 1 / 3], rtol=1e-6)
    np.testing.assert_array_equal(context_features(np.float32([4.0]), 1), [[4.0, 0.0, 1.0]])


def test_context_features_are_padding_and_tail_independent() -> None:
    rng = np.random.default_rng(9)
    up = rng.standard_normal(12).astype(np.float32)
    ref = context_features(up, 6)
    # A different tail past the window changes nothing.
    other = up.copy()
    other[6:] = 1e6
    np.testing.assert_array_equal(context_features(other, 6), ref)
    # Padding the batch to a larger M changes nothing in the real rows.
    lists = _lists(seed=10, n_lists=2)
    norm = FeatureNormalizer(TINY_SPEC).fit(lists)
    inputs = [norm.transform(cl) for cl in lists]
    small, big = pad_lists(inputs, TINY_SPEC, 4), pad_lists(inputs, TINY_SPEC, 9)
    np.testing.assert_array_equal(big.context[:, :4], small.context)
    np.testing.assert_array_equal(big.candidate["a"][:, :4], small.candidate["a"])
