from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import generated_lists, tiny_model, tiny_model_config

from cotrr_ray.bundles.bundle import MANIFEST, REQUIRED_FILES, Bundle, BundleError, read_meta
from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import FeatureNormalizer
from cotrr_ray.core.scoring import predict_logits
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.training.prepare import pad_split

TOP_M = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle of an untrained tiny model + normaliser fitted on tiny data + a min_samples=1 calibrator."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bundle")
    train = generated_lists(20, seed=0, top_m=TOP_M)
    held_out = generated_lists(12, seed=1, min_candidates=5, max_candidates=14, top_m=TOP_M)
    normalizer = FeatureNormalizer(IMAGE_SEARCH_SPEC).fit(train)
    model = tiny_model(tiny_model_config(top_m=TOP_M), seed=0)
    m = max(cl.window for cl in held_out)
    logits = predict_logits(model, pad_split(held_out, normalizer, m))
    window_logits = [logits[i, : cl.window] for i, cl in enumerate(held_out)]
    y = np.concatenate([cl.labels[: cl.window] >= 1 for cl in held_out]).astype(float)
    calibrator = IsotonicCalibrator(min_samples=1).fit(np.concatenate(window_logits), y)
    png = root / "reliability.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = Bundle.save(
        root / "b",
        model=model,
        spec=IMAGE_SEARCH_SPEC,
        normalizer=normalizer,
        calibrator=calibrator,
        relevance_threshold=1.0,
        metrics={"headline": {"test_ndcg@10_model": 0.5}, "test": {"queries": 12}},
        train_config={"optim": {"lr": 0.001}},
        data_fingerprint="sha256:" + "0" * 64,
        extra_files={"reliability.png": png},
    )
    return {
        "path": path,
        "lists": held_out,
        "window_logits": window_logits,
        "calibrator": calibrator,
        "normalizer": normalizer,
    }


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A private copy of the bundle for tests that damage it."""
    return Path(shutil.copytree(built["path"], tmp_path / "b"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_error(path: Path) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.load(path)
    return str(info.value)


def _rewrite(bundle: Path, name: str, obj, fix_checksum: bool) -> None:
    (bundle / name).write_text(json.dumps(obj, indent=2) + "\n")
    if fix_checksum:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"][name] = _sha(bundle / name)
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------- round trip


def test_save_load_reproduces_scores_exactly(built) -> None:
    b = Bundle.load(built["path"])
    scores = b.score(built["lists"])
    assert len(scores) == len(built["lists"])
    for got, want, cl in zip(scores, built["window_logits"], built["lists"]):
        assert got.shape == (cl.window,) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    # Not a constant model: the equality above is informative.
    assert np.std(np.concatenate(scores)) > 1e-3
    probs = b.probabilities(np.concatenate(scores))
    np.testing.assert_array_equal(probs, built["calibrator"].predict(np.concatenate(built["window_logits"])))


def test_loaded_parts_match_what_was_saved(built) -> None:
    b = Bundle.load(built["path"])
    assert b.spec == IMAGE_SEARCH_SPEC and read_meta(built["path"]).spec == IMAGE_SEARCH_SPEC
    assert b.top_m == TOP_M and b.relevance_threshold == 1.0
    assert b.model_config == tiny_model_config(top_m=TOP_M)
    assert not b.model.training
    for k, (m, s) in built["normalizer"].stats_.items():
        np.testing.assert_array_equal(b.normalizer.stats_[k][0], m)
        np.testing.assert_array_equal(b.normalizer.stats_[k][1], s)
    np.testing.assert_array_equal(b.calibrator.x_thresholds_, built["calibrator"].x_thresholds_)
    assert b.bundle_id.startswith(IMAGE_SEARCH_SPEC.version)


def test_manifest_lists_every_file_with_sha256_and_versions(built) -> None:
    path = built["path"]
    manifest = json.loads((path / MANIFEST).read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert set(REQUIRED_FILES) | {"reliability.png"} == set(on_disk)
    for name, digest in manifest["files"].items():
        assert digest == _sha(path / name)
    import ray
    import sklearn

    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__ and versions["sklearn"] == sklearn.__version__
    assert versions["ray"] == ray.__version__ and versions["numpy"] == np.__version__
    assert "cotrr_ray" in versions and "python" in versions
    assert manifest["feature_spec_fingerprint"] == IMAGE_SEARCH_SPEC.fingerprint()
    assert manifest["relevance_threshold"] == 1.0
    assert manifest["data_fingerprint"].startswith("sha256:")
    assert manifest["train_config"] == {"optim": {"lr": 0.001}}
    assert manifest["headline_metrics"] == {"test_ndcg@10_model": 0.5}
    assert manifest["num_parameters"] == Bundle.load(path).model.num_parameters()
    assert manifest["bundle_id"] and manifest["created_at"]


def test_saved_weights_load_with_weights_only(built) -> None:
    state = torch.load(built["path"] / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_save_never_rewrites_an_existing_bundle(built, tmp_path) -> None:
    b = Bundle.load(built["path"])
    kw = dict(
        model=b.model,
        spec=b.spec,
        normalizer=b.normalizer,
        calibrator=b.calibrator,
        relevance_threshold=2.0,
        metrics={},
        train_config={},
        data_fingerprint="x",
    )
    target = Bundle.save(tmp_path / "out", **kw)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(BundleError, match="exists; a bundle is written once"):
        Bundle.save(target, **kw)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert Bundle.load(target).relevance_threshold == 2.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left behind


# --------------------------------------------------------------------------- failing closed


def test_flipped_byte_in_weights_is_caught(copy) -> None:
    data = bytearray((copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.pt").write_bytes(bytes(data))
    msg = _load_error(copy)
    assert "model.pt" in msg and "checksum mismatch" in msg


def test_edited_calibrator_is_caught(copy) -> None:
    cal = json.loads((copy / "calibrator.json").read_text())
    cal["y_thresholds"][-1] = 0.5 * cal["y_thresholds"][-1]
    _rewrite(copy, "calibrator.json", cal, fix_checksum=False)
    msg = _load_error(copy)
    assert "calibrator.json" in msg and "checksum mismatch" in msg


@pytest.mark.parametrize("name", [*REQUIRED_FILES, "reliability.png"])
def test_any_modified_file_is_caught_and_named(copy, name: str) -> None:
    with open(copy / name, "ab") as f:
        f.write(b" ")
    msg = _load_error(copy)
    assert f"checksum mismatch for {name}" in msg


@pytest.mark.parametrize("name", [*REQUIRED_FILES, "reliability.png"])
def test_missing_file_is_caught_and_named(copy, name: str) -> None:
    (copy / name).unlink()
    assert f"missing file {name}" in _load_error(copy)


def test_missing_manifest(copy) -> None:
    (copy / MANIFEST).unlink()
    assert f"missing {MANIFEST}" in _load_error(copy)


def test_manifest_must_list_required_files(copy) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["normalizer.json"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert "normalizer.json" in _load_error(copy)


def test_unsupported_format_version(copy) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert "format_version" in _load_error(copy)


def test_wrong_feature_spec_caught_by_fingerprint(copy) -> None:
    spec = json.loads((copy / "feature_spec.json").read_text())
    spec["candidate"]["visual"] = 9
    _rewrite(copy, "feature_spec.json", spec, fix_checksum=True)  # only the fingerprint can catch it now
    msg = _load_error(copy)
    assert "feature_spec.json" in msg and "fingerprint" in msg


def test_consistently_swapped_spec_caught_by_normalizer(copy) -> None:
    # Even with the manifest's fingerprint updated too, the normaliser was fitted for the old spec.
    spec = json.loads((copy / "feature_spec.json").read_text())
    spec["version"] = "image-search-v2"
    _rewrite(copy, "feature_spec.json", spec, fix_checksum=True)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["feature_spec_fingerprint"] = IMAGE_SEARCH_SPEC.model_copy(
        update={"version": "image-search-v2"}
    ).fingerprint()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert "different feature spec" in _load_error(copy)


def test_model_config_not_matching_spec(copy) -> None:
    cfg = json.loads((copy / "model_config.json").read_text())
    cfg["candidate_groups"][2][1] = 9  # visual: 8 -> 9
    _rewrite(copy, "model_config.json", cfg, fix_checksum=True)
    assert "model_config groups do not match" in _load_error(copy)


def test_unreadable_json_named(copy) -> None:
    (copy / "calibrator.json").write_text("{not json")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["calibrator.json"] = _sha(copy / "calibrator.json")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    msg = _load_error(copy)
    assert "calibrator.json" in msg and "unreadable JSON" in msg


def test_weights_of_another_shape_rejected(copy) -> None:
    other = tiny_model(tiny_model_config(top_m=TOP_M, d_model=16), seed=1)
    torch.save(other.state_dict(), copy / "model.pt")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["model.pt"] = _sha(copy / "model.pt")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert "invalid bundle" in _load_error(copy)


def test_missing_directory(tmp_path) -> None:
    assert "no bundle directory" in _load_error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "no bundle directory" in _load_error(tmp_path / "file")


def test_score_refuses_windows_longer_than_top_m(built) -> None:
    b = Bundle.load(built["path"])
    long = generated_lists(1, seed=5, min_candidates=12, max_candidates=12, top_m=12)
    with pytest.raises(ValueError, match="top_m"):
        b.score(long)
