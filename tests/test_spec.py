from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC, FeatureSpec


def _spec(**kw) -> FeatureSpec:
    base = {"version": "v1", "candidate": {"a": 3, "b": 2}, "query": {"q": 2}}
    base.update(kw)
    return FeatureSpec(**base)


def test_fingerprint_is_stable_hex_sha256_and_equal_for_equal_specs() -> None:
    a, b = _spec(), _spec()
    assert a.fingerprint() == a.fingerprint() == b.fingerprint()
    fp = a.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    # A JSON round trip (what a bundle's feature_spec.json does) keeps the fingerprint.
    again = FeatureSpec.model_validate(json.loads(json.dumps(a.model_dump(mode="json"))))
    assert again.fingerprint() == fp
    assert FeatureSpec.model_validate(IMAGE_SEARCH_SPEC.model_dump()).fingerprint() == IMAGE_SEARCH_SPEC.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"version": "v2"},
        {"candidate": {"a": 4, "b": 2}},
        {"candidate": {"a": 3, "c": 2}},
        {"candidate": {"a": 3}},
        {"query": {}},
        {"query": {"q": 3}},
        {"transforms": {"candidate.a": "none"}},
        {"transforms": {"candidate.a": "signed_log1p_standardize"}},
    ],
)
def test_fingerprint_differs_when_anything_differs(change) -> None:
    assert _spec(**change).fingerprint() != _spec().fingerprint()


def test_fingerprint_depends_on_candidate_group_order() -> None:
    # Group order is the model's input order, so swapping it must not look like the same spec.
    assert _spec(candidate={"b": 2, "a": 3}).fingerprint() != _spec().fingerprint()


def test_fingerprint_ignores_transforms_key_order() -> None:
    a = _spec(transforms={"candidate.a": "none", "query.q": "none"})
    b = _spec(transforms={"query.q": "none", "candidate.a": "none"})
    assert a == b
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"candidate": {"a": 0}}, "dim >= 1"),
        ({"candidate": {"a": -3}}, "dim >= 1"),
        ({"query": {"q": 0}}, "dim >= 1"),
        ({"candidate": {"": 3}}, "non-empty name"),
        ({"candidate": {}}, "at least one candidate group"),
    ],
)
def test_validation_errors(kw, fragment) -> None:
    with pytest.raises(ValidationError, match=fragment):
        _spec(**kw)


def test_unknown_fields_and_transform_names_rejected() -> None:
    with pytest.raises(ValidationError):
        _spec(extra_field=1)
    with pytest.raises(ValidationError):
        _spec(transforms={"candidate.a": "log"})


def test_transform_for_unknown_group_rejected() -> None:
    with pytest.raises(ValidationError):
        _spec(transforms={"candidate.aa": "none"})


def test_spec_is_frozen() -> None:
    s = _spec()
    with pytest.raises(ValidationError):
        s.version = "other"  # type: ignore[misc]


def test_transforms_default_to_standardize() -> None:
    s = _spec(transforms={"candidate.b": "signed_log1p_standardize", "query.q": "none"})
    assert s.transform_for("candidate", "a") == "standardize"
    assert s.transform_for("candidate", "b") == "signed_log1p_standardize"
    assert s.transform_for("query", "q") == "none"
    # The key is scoped: a query group with a candidate group's name is not affected.
    assert _spec(transforms={"candidate.a": "none"}).transform_for("query", "a") == "standardize"


def test_image_search_spec_defaults() -> None:
    s = IMAGE_SEARCH_SPEC
    assert list(s.candidate.items()) == [
        ("image_embedding", 512),
        ("text_embedding", 512),
        ("visual", 8),
        ("conflict", 5),
    ]
    assert s.query == {"text_embedding": 512}
    assert s.transform_for("candidate", "image_embedding") == "none"
    assert s.transform_for("candidate", "visual") == "standardize"
    assert "visual[8]" in s.describe()
