"""Serving from the registry without Ray: a Scorer core that follows an alias, a Calibrator core that
loads the calibrator of whatever id a scorer reports, on local disk and on the loopback S3 server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _bundles import TOP_M

from cotrr_ray.bundles.bundle import MANIFEST, read_meta
from cotrr_ray.bundles.registry import BundleSource, Registry
from cotrr_ray.serving.scorer import CalibrationInput, CalibratorCore, ScorerCore, synthetic_list


@pytest.fixture
def registry(registry_uri, bundle_a, bundle_b, tmp_path, monkeypatch) -> Registry:
    monkeypatch.setenv("COTRR_BUNDLE_CACHE", str(tmp_path / "cache"))
    reg = Registry(registry_uri)
    reg.publish(bundle_a, "demo")
    reg.publish(bundle_b, "demo")
    reg.set_alias("demo", "production", read_meta(bundle_a).bundle_id)
    return reg


def test_scorer_follows_a_moved_alias_and_reports_the_fixed_uri(registry, bundle_a, bundle_b) -> None:
    a, b = read_meta(bundle_a).bundle_id, read_meta(bundle_b).bundle_id
    source = BundleSource.parse(f"{registry.uri}/demo@production")
    core = ScorerCore.load(source.uri)
    cl = synthetic_list(core.bundle.spec, n=10, window=TOP_M)
    first = core.score([cl])[0]
    assert (first.model_version, first.bundle_uri) == (a, registry.bundle_uri("demo", a))
    assert core.follow(source) is False  # the alias has not moved

    registry.set_alias("demo", "production", b)
    assert core.follow(source) is True
    after = core.score([cl])[0]
    assert (after.model_version, after.bundle_uri) == (b, registry.bundle_uri("demo", b))
    assert not np.allclose(after.logits, first.logits)  # really the other weights

    registry.rollback("demo")
    assert core.follow(source) is True and core.score([cl])[0].model_version == a
    assert core.info()["swaps"] == {"ok": 2}


def test_a_bad_bundle_behind_the_alias_costs_one_error_not_one_per_poll(registry, bundle_a, tmp_path) -> None:
    a = read_meta(bundle_a).bundle_id
    # A published bundle with another feature spec cannot serve this app's requests.
    other = tmp_path / "other"
    shutil.copytree(bundle_a, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["bundle_id"] = "other-spec"
    manifest["feature_spec_fingerprint"] = "0" * 16  # Bundle.load refuses: fingerprint mismatch
    (other / MANIFEST).write_text(json.dumps(manifest))
    registry.publish(other, "demo")

    source = BundleSource.parse(f"{registry.uri}/demo@production")
    core = ScorerCore.load(source.uri)
    registry.set_alias("demo", "production", "other-spec")
    assert core.follow(source) is False and core.follow(source) is False
    assert core.info()["swaps"] == {"error": 1} and "other-spec" in core.info()["last_swap_error"]
    assert core.bundle.bundle_id == a  # still serving the last good bundle
    registry.rollback("demo")
    assert core.follow(source) is False  # back on what it serves: nothing to do


def test_calibrator_loads_the_id_a_scorer_reports_from_its_uri(registry, bundle_a, bundle_b) -> None:
    b = read_meta(bundle_b).bundle_id
    calibrators = CalibratorCore()
    calibrators.add(f"{registry.uri}/demo@production")  # the start id (a)
    item = CalibrationInput(b, registry.bundle_uri("demo", b), np.linspace(-2, 2, TOP_M).astype(np.float32))
    missing = calibrators.missing([item])
    assert missing == {b: registry.bundle_uri("demo", b)}
    assert calibrators.load_missing(missing) == {}
    assert sorted(calibrators.bundle_ids) == sorted([read_meta(bundle_a).bundle_id, b])  # both, during a swap
    p = calibrators.transform(item)
    assert p.shape == (TOP_M,) and np.all((0 <= p) & (p <= 1))
