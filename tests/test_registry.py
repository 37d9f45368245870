"""The bundle registry on local disk and on a real S3-compatible server on loopback (moto's server).

Every registry test runs twice (`registry_uri` is a local directory, then an s3:// prefix): publish,
immutability, torn publishes, aliases with compare-and-swap, promotion, rollback, gc, the replica
cache and the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cotrr_ray import storage
from cotrr_ray.bundles.bundle import MANIFEST, Bundle, read_meta
from cotrr_ray.bundles.cli import main as cli
from cotrr_ray.bundles.registry import AliasConflict, BundleSource, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]


def bid(path: Path) -> str:
    return read_meta(path).bundle_id


@pytest.fixture
def published(registry_uri, bundle_a, bundle_b) -> Registry:
    reg = Registry(registry_uri)
    reg.publish(bundle_a, "demo")
    reg.publish(bundle_b, "demo")
    return reg


# ----------------------------------------------------------------------------- publish


def test_publish_lists_reads_and_loads_through_the_cache(registry_uri, bundle_a, tmp_path):
    reg = Registry(registry_uri)
    uri = reg.publish(bundle_a, "demo")
    assert uri == f"{reg.uri}/demo/{bid(bundle_a)}"
    assert reg.names() == ["demo"]
    assert [m["bundle_id"] for m in reg.bundles("demo")] == [bid(bundle_a)]
    assert reg.manifest("demo", bid(bundle_a)) == json.loads((bundle_a / MANIFEST).read_text())
    local = reg.fetch("demo", bid(bundle_a), cache_dir=tmp_path / "cache")
    if reg.root.local:
        assert local == Path(uri)  # a local registry is read in place
    else:
        assert local == tmp_path / "cache" / bid(bundle_a)
    assert Bundle.load(local).bundle_id == bid(bundle_a)  # every checksum verified again


def test_a_published_id_is_never_rewritten(registry_uri, bundle_a):
    reg = Registry(registry_uri)
    reg.publish(bundle_a, "demo")
    before = storage.read_bytes(reg.bundle_location("demo", bid(bundle_a)).child("model.pt"))
    with pytest.raises(RegistryError, match="already published.*immutable"):
        reg.publish(bundle_a, "demo")
    assert storage.read_bytes(reg.bundle_location("demo", bid(bundle_a)).child("model.pt")) == before


def test_publish_refuses_bytes_that_differ_from_the_manifest(registry_uri, bundle_a, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_a, copy)
    (copy / "calibrator.json").write_text("{}")  # the manifest's sha256 no longer matches
    reg = Registry(registry_uri)
    with pytest.raises(RegistryError, match="calibrator.json.*sha256"):
        reg.publish(copy, "demo")
    assert reg.bundles("demo") == []  # no manifest was written: nothing published


TORN_PUBLISH = """
import os, sys
from cotrr_ray import storage
from cotrr_ray.bundles.registry import Registry
real, calls = storage.upload_file, []
def dying_upload(src, loc):
    real(src, loc)
    calls.append(loc)
    if len(calls) == 3:
        os._exit(9)  # killed mid-publish: some files are up, the manifest is not
storage.upload_file = dying_upload
Registry(sys.argv[1]).publish(sys.argv[2], "demo")
"""


def test_a_publish_killed_mid_write_leaves_no_visible_bundle(published, registry_uri, bundle_a, tmp_path):
    import shutil

    # A third bundle id: bundle_a's files under a new id and a matching manifest.
    src = tmp_path / "third"
    shutil.copytree(bundle_a, src)
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["bundle_id"] = "torn-bundle"
    (src / MANIFEST).write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TORN_PUBLISH, registry_uri, str(src)], env=env, timeout=120)
    assert proc.returncode == 9
    files = [n for n, _ in storage.list_dir(published.bundle_location("demo", "torn-bundle"))]
    assert len(files) >= 3 and MANIFEST not in files  # the torn state really happened
    assert "torn-bundle" not in [m["bundle_id"] for m in published.bundles("demo")]
    with pytest.raises(RegistryError, match="unfinished publish"):
        published.manifest("demo", "torn-bundle")
    with pytest.raises(RegistryError, match="no published bundle"):
        BundleSource.parse(published.bundle_uri("demo", "torn-bundle")).resolve(tmp_path / "cache")
    with pytest.raises(RegistryError, match="unfinished publish"):
        published.set_alias("demo", "production", "torn-bundle")
    # gc leaves a fresh unfinished publish alone (it may still be uploading), then removes it once idle.
    assert published.gc("demo", keep=10) == []
    assert published.gc("demo", keep=10, unfinished_after_s=-1) == ["torn-bundle"]
    assert storage.list_dir(published.bundle_location("demo", "torn-bundle")) == []


# ----------------------------------------------------------------------------- aliases


def test_alias_set_get_history_and_compare_and_swap(published, bundle_a, bundle_b):
    a, b = bid(bundle_a), bid(bundle_b)
    first = published.set_alias("demo", "production", a, expected=None)
    assert (first.seq, first.previous, first.bundle_id) == (1, None, a)
    assert published.resolve("demo", "production") == a
    with pytest.raises(AliasConflict, match=f"names '{a}', not the expected '{b}'"):
        published.set_alias("demo", "production", a, expected=b)
    second = published.set_alias("demo", "production", b, expected=a, reason="retrain")
    assert (second.seq, second.previous, second.reason) == (2, a, "retrain")
    assert [(m.previous, m.bundle_id) for m in published.history("demo", "production")] == [(None, a), (a, b)]
    assert "@" in second.by and second.at
    assert published.aliases("demo") == {"production": b}


def test_concurrent_promoters_never_lose_an_update(published, bundle_a, bundle_b):
    """Eight writers read the alias (a), then all try to move it to b: exactly one wins, seven get AliasConflict.

    (The compare is on the value: a writer that finds the value it expected may write, so all of them
    move a -> b here; a winner writing a -> a would rightly let the next one through.)"""
    a, b = bid(bundle_a), bid(bundle_b)
    published.set_alias("demo", "production", a)
    barrier, outcomes = threading.Barrier(8), []

    def promoter(i: int) -> None:
        expected = published.resolve("demo", "production")
        barrier.wait()
        try:
            published.set_alias("demo", "production", b, expected=expected, reason=f"writer {i}")
            outcomes.append("won")
        except AliasConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=promoter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    assert len(published.history("demo", "production")) == 2


def test_promote_and_rollback(published, bundle_a, bundle_b):
    a, b = bid(bundle_a), bid(bundle_b)
    published.set_alias("demo", "production", a)
    published.set_alias("demo", "candidate", b)
    moved = published.promote("demo")
    assert (moved.previous, moved.bundle_id, moved.reason) == (a, b, "promote candidate")
    back = published.rollback("demo")
    assert (back.previous, back.bundle_id) == (b, a) and back.reason.startswith("rollback")
    assert published.resolve("demo", "production") == a


def test_clear_errors_for_missing_things(published, registry_uri, tmp_path):
    with pytest.raises(RegistryError, match="alias 'production' of model 'demo' is not set"):
        published.resolve("demo", "production")
    with pytest.raises(RegistryError, match="not set"):
        published.rollback("demo")
    published.set_alias("demo", "production", published.bundles("demo")[0]["bundle_id"])
    with pytest.raises(RegistryError, match="no previous bundle"):
        published.rollback("demo")
    with pytest.raises(RegistryError, match="'nope' of model 'demo'.*no such bundle"):
        published.manifest("demo", "nope")
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(str(tmp_path / "nowhere")).names()
    with pytest.raises(RegistryError, match="invalid alias"):
        published.resolve("demo", "Bad Alias")


def test_gc_keeps_the_newest_and_every_aliased_bundle(published, bundle_a, bundle_b, tmp_path):
    import shutil

    ids = [bid(bundle_a), bid(bundle_b)]
    for i in range(3):  # three more bundles, newer than a and b
        src = tmp_path / f"extra{i}"
        shutil.copytree(bundle_a, src)
        manifest = json.loads((src / MANIFEST).read_text())
        manifest["bundle_id"], manifest["created_at"] = f"extra-{i}", f"2999-01-0{i + 1}T00:00:00+00:00"
        (src / MANIFEST).write_text(json.dumps(manifest))
        published.publish(src, "demo")
        ids.append(f"extra-{i}")
    published.set_alias("demo", "production", ids[0])  # the oldest: aliased
    published.set_alias("demo", "production", ids[1])  # now production; ids[0] is the rollback target
    assert published.gc("demo", keep=1, dry_run=True) == ["extra-0", "extra-1"]
    assert len(published.bundles("demo")) == 5  # dry run deleted nothing
    assert published.gc("demo", keep=1) == ["extra-0", "extra-1"]
    # a and b may share a created_at second (then they sort by id): compare them as a set
    kept = [m["bundle_id"] for m in published.bundles("demo")]
    assert set(kept[:2]) == {ids[0], ids[1]} and kept[2:] == ["extra-2"]
    assert published.rollback("demo").bundle_id == ids[0]  # the rollback target survived


# ----------------------------------------------------------------------------- sources and the cache


def test_bundle_source_forms(published, bundle_a, bundle_b, tmp_path):
    a = bid(bundle_a)
    published.set_alias("demo", "production", a)
    alias = BundleSource.parse(f"{published.uri}/demo@production")
    assert alias.moving and alias.alias == "production" and alias.current_id() == a
    uri, local = alias.resolve(tmp_path / "cache")
    assert uri == published.bundle_uri("demo", a) and Bundle.load(local).bundle_id == a
    fixed = BundleSource.parse(published.bundle_uri("demo", bid(bundle_b)))
    assert not fixed.moving and fixed.current_id() == bid(bundle_b)
    plain = BundleSource.parse(str(bundle_a))
    assert plain.resolve() == (str(bundle_a), bundle_a)
    assert BundleSource.parse("rel/dir", "/base").location.path == "/base/rel/dir"


def test_the_cache_reuses_verified_copies_and_replaces_corrupt_ones(s3_bucket, bundle_a, tmp_path, monkeypatch):
    reg = Registry(f"{s3_bucket}/cache-test")
    reg.publish(bundle_a, "demo")
    cache = tmp_path / "cache"
    local = reg.fetch("demo", bid(bundle_a), cache)
    downloads = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda loc, dst: (downloads.append(loc), real(loc, dst)))
    assert reg.fetch("demo", bid(bundle_a), cache) == local and downloads == []  # verified copy reused
    (local / "model.pt").write_bytes(b"corrupt")
    assert reg.fetch("demo", bid(bundle_a), cache) == local and downloads  # re-downloaded
    assert Bundle.load(local).bundle_id == bid(bundle_a)
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{bid(bundle_a)}.") and "stale" not in p.name]


# ----------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, object, str]:
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_cli_list_show_alias_promote_rollback_gc(published, bundle_a, bundle_b, capsys):
    a, b, model = bid(bundle_a), bid(bundle_b), f"{published.uri}/demo"
    assert run_cli(capsys, "list", published.uri)[1]["models"] == ["demo"]
    assert run_cli(capsys, "alias", "set", model, "production", a, "--expect", "none")[0] == 0
    assert run_cli(capsys, "alias", "set", model, "candidate", b)[0] == 0
    listed = run_cli(capsys, "list", model)[1]
    assert listed["aliases"] == {"production": a, "candidate": b}
    assert {x["bundle_id"]: x["aliases"] for x in listed["bundles"]} == {a: ["production"], b: ["candidate"]}
    assert run_cli(capsys, "show", model, "@production")[1]["manifest"]["bundle_id"] == a
    assert run_cli(capsys, "promote", model)[1]["bundle_id"] == b
    assert run_cli(capsys, "alias", "get", model, "production")[1]["bundle_id"] == b
    assert run_cli(capsys, "rollback", model)[1]["bundle_id"] == a
    assert [m["bundle_id"] for m in run_cli(capsys, "alias", "history", model, "production")[1]] == [a, b, a]
    assert run_cli(capsys, "gc", model, "--keep", "0")[1]["deleted"] == []  # both aliased


def test_cli_errors_exit_2_with_one_line(published, capsys, tmp_path):
    model = f"{published.uri}/demo"
    code, _, err = run_cli(capsys, "alias", "get", model, "production")
    assert code == 2 and err.startswith("error: alias 'production'") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "alias", "set", model, "production", "missing-id")
    assert code == 2 and "no such bundle" in err
    code, _, err = run_cli(capsys, "list", str(tmp_path / "nowhere" / "demo"))
    assert code == 2 and "no registry at" in err
    code, _, err = run_cli(
        capsys,
        "alias",
        "set",
        model,
        "production",
        published.bundles("demo")[0]["bundle_id"],
        "--expect",
        "someone-else",
    )
    assert code == 2 and "not the expected" in err


def test_cli_runs_as_a_module(published):
    proc = subprocess.run(
        [sys.executable, "-m", "cotrr_ray.registry", "list", f"{published.uri}/demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["bundles"]) == 2


def test_storage_uris_and_unsupported_writes(tmp_path):
    assert storage.locate("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert storage.locate("file:///x/y").uri == "/x/y" and storage.locate("rel", tmp_path).uri == str(tmp_path / "rel")
    for bad in ("http://h/x", "hdfs://nn/x", "s3://"):
        with pytest.raises(storage.StorageError):
            storage.locate(bad)
    with pytest.raises(storage.StorageError, match="conditional writes.*local paths and s3:// only"):
        storage.create_exclusive(storage.Location("gs", "bucket/registry/registry.json"), b"{}")
    target = storage.locate(tmp_path / "x.json")
    storage.create_exclusive(target, b"1")
    with pytest.raises(storage.AlreadyExists):
        storage.create_exclusive(target, b"2")
    assert storage.read_bytes(target) == b"1" and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
