"""Offline batch reranking (`python -m cotrr_ray.batch`): equal to the HTTP API, input formats, storage, errors.

The Ray-free checks (everything the driver refuses before an actor starts) run in milliseconds;
the Ray Data runs share the session's Ray (the `serve_session` cluster), so the HTTP comparison is
against a real Serve app on the same machine.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import httpx
import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from _bundles import request_body

from cotrr_ray.batch.cli import main
from cotrr_ray.batch.rerank import BatchJob, BatchOptions, BatchReranker, jsonl_tables, read_results
from cotrr_ray.bundles.bundle import read_meta
from cotrr_ray.bundles.registry import Registry
from cotrr_ray.config import AppArgs, RoutingConfig
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.data.convert import convert
from cotrr_ray.data.parquet import MANIFEST, open_parquet_dataset, read_parquet_records, write_dataset
from cotrr_ray.data.readers import DataError, read_jsonl

QUERIES = 60  # of the session's 150 synthetic queries: enough for several batches and shards


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, test_data) -> Path:
    """The first QUERIES lines of the session's data (labelled: batch input may carry labels)."""
    path = tmp_path_factory.mktemp("batch") / "lists.jsonl"
    path.write_text("".join(test_data.read_text().splitlines(keepends=True)[:QUERIES]))
    return path


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, jsonl) -> Path:
    out = tmp_path_factory.mktemp("batch") / "dataset"
    convert(jsonl, out, window=8, queries_per_shard=25)  # the data carries features for its first 8 only
    return out


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def rows(uri) -> list[dict]:
    return read_results(str(uri))[1].to_pylist()


# A list's logits depend (in the last bits) on which lists share its model batch, which differs
# between the HTTP app's, the JSONL path's and the Parquet path's batches. The isotonic calibrator
# interpolates between its thresholds, and where it is steep it multiplies such a difference
# (seen: 7e-6 on a probability for a 1e-7 logit difference), hence the looser probability bound.
TOLERANCE = {"score": 1e-6, "probability": 1e-4}


def close(a: float | None, b: float | None, field: str) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=TOLERANCE[field])


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == QUERIES
    for x, y in zip(a, b):
        exact = ("query_id", "model_version", "calibrated", "ids", "index")
        assert {k: x[k] for k in exact} == {k: y[k] for k in exact}
        for field in ("score", "probability"):
            assert all(close(u, v, field) for u, v in zip(x[field], y[field], strict=True)), (x["query_id"], field)


# ============================================================================ Ray-free


def test_jsonl_and_parquet_batches_score_identically(bundle_a, jsonl, parquet) -> None:
    """One actor's work on both inputs, in process: same order and ids, scores to float tolerance
    (the two inputs are cut into different model batches here: 20 a table vs 20 of 25-query shards)."""
    meta = read_meta(bundle_a)
    job = BatchJob(str(bundle_a), meta.bundle_id, meta.spec, meta.top_m, meta.top_m, None)
    reranker = BatchReranker(job)
    from_jsonl = [reranker(t) for t in jsonl_tables(str(jsonl), meta.spec, meta.top_m, queries=20)]
    ds = open_parquet_dataset(parquet, meta.spec)
    pq_job = BatchJob(str(bundle_a), meta.bundle_id, meta.spec, meta.top_m, ds.window, None)
    from_parquet = [BatchReranker(pq_job)(pa_table(b)) for b in ds.iter_batches(batch_size=20)]
    a = [r for t in from_jsonl for r in t.to_pylist()]
    b = [r for t in from_parquet for r in t.to_pylist()]
    assert_same_rows(a, b)
    assert all(r["model_version"] == meta.bundle_id and r["calibrated"] for r in a)
    assert all(sum(s is not None for s in r["score"]) == 8 < len(r["ids"]) for r in a)  # window scored, tail kept


def pa_table(batch):
    import pyarrow as pa

    return pa.Table.from_batches([batch])


@pytest.mark.parametrize(
    "break_it, reader",
    [
        ("manifest", lambda p, spec: read_parquet_records(p, spec, window=8)),
        ("spec", None),
        ("shard", lambda p, spec: read_parquet_records(p, spec, window=8)),
    ],
)
def test_bad_parquet_input_fails_before_ray_with_the_readers_message(
    capsys, bundle_a, jsonl, tmp_path, break_it, reader
) -> None:
    spec = IMAGE_SEARCH_SPEC
    data = tmp_path / "ds"
    if break_it == "spec":  # same groups, another spec version: its fingerprint differs
        other = spec.model_copy(update={"version": "image-search-v0"})
        write_dataset(read_jsonl(jsonl, other, window=8), data, other, window=8)
    else:
        convert(jsonl, data, window=8, queries_per_shard=25)
        if break_it == "manifest":
            (data / MANIFEST).unlink()
        else:
            (data / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError) as expected:
        open_parquet_dataset(data, spec) if reader is None else reader(data, spec)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--bundle", str(bundle_a), "--input", str(data), "--output", str(out))
    assert code == 2 and err.strip() == f"error: {expected.value}"
    assert {
        "manifest": "no _manifest.json",
        "spec": "written for feature spec 'image-search-v0'",
        "shard": "part-00001",
    }[break_it] in err
    assert not out.exists()


def test_missing_bundle_and_bad_options_fail_closed(capsys, bundle_a, parquet, tmp_path) -> None:
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "--bundle", str(tmp_path / "nope"), "--input", str(parquet), "--output", out)
    assert code == 2 and "nope" in err and "manifest.json" in err
    code, err = run_cli(
        capsys, "--bundle", str(tmp_path / "reg/m@production"), "--input", str(parquet), "--output", out
    )
    assert code == 2 and "no registry" in err
    code, err = run_cli(capsys, "--bundle", str(bundle_a), "--input", str(parquet), "--output", out, "--top-m", "9")
    assert code == 2 and "top_m must be in 1..8" in err
    code, err = run_cli(capsys, "--bundle", str(bundle_a), "--input", str(tmp_path / "x.jsonl"), "--output", out)
    assert code == 2 and "x.jsonl: no such file" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, err = run_cli(capsys, "--bundle", str(bundle_a), "--input", str(parquet), "--output", out)
    assert code == 2 and "is not empty" in err
    assert not Path(out, MANIFEST).exists()


# ============================================================================ Ray Data runs

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def http_app(serve_session, bundle_a):
    from ray import serve

    from cotrr_ray.serving.app import build_app

    args = AppArgs(bundle_uri=str(bundle_a), routing=RoutingConfig(rollout_percentage=100))
    serve.run(build_app(args), name="batchcmp", route_prefix="/batchcmp")
    with httpx.Client(base_url=serve_session.http_url, timeout=30) as client:
        yield client
    serve.delete("batchcmp")


@pytest.fixture(scope="module")
def batch_parquet(serve_session, bundle_a, parquet, tmp_path_factory) -> Path:
    """One batch run over the Parquet input: 2 actors, batches of 16, shards of 20 queries."""
    out = tmp_path_factory.mktemp("batch") / "out-parquet"
    opts = BatchOptions(str(bundle_a), str(parquet), str(out), batch_size=16, actors=2, queries_per_shard=20)
    from cotrr_ray.batch.pipeline import run

    run(opts)
    return out


@integration
def test_batch_output_equals_the_http_api(http_app, batch_parquet, records) -> None:
    got = {r["query_id"]: r for r in rows(batch_parquet)}
    assert len(got) == QUERIES
    for rec in records[:QUERIES]:
        r = http_app.post("/batchcmp/v1/rerank", content=orjson.dumps(request_body(rec)))
        assert r.status_code == 200, r.text
        api = r.json()
        assert api["fallback"] is None and api["calibrated"]
        row = got[rec["id"]]
        assert row["model_version"] == api["model_version"]
        assert row["ids"] == [x["id"] for x in api["results"]]  # same order, tail included
        assert row["index"] == [x["index"] for x in api["results"]]
        for field in ("score", "probability"):
            for b, h in zip(row[field], [x[field] for x in api["results"]], strict=True):
                assert close(b, h, field), (rec["id"], field, b, h)
        assert sum(s is not None for s in row["score"]) == 8  # the bundle's top_m, the API's default


@integration
def test_manifest_lists_every_shard_in_order_and_is_written_last(batch_parquet, records) -> None:
    manifest = json.loads((batch_parquet / MANIFEST).read_text())
    shards = [s["path"] for s in manifest["shards"]]
    assert sorted(p.name for p in batch_parquet.iterdir()) == sorted([*shards, MANIFEST])  # no temp files left
    assert [s["queries"] for s in manifest["shards"]] == [20, 20, 20] and manifest["queries"] == QUERIES
    last_shard = max((batch_parquet / s).stat().st_mtime_ns for s in shards)
    assert (batch_parquet / MANIFEST).stat().st_mtime_ns >= last_shard
    # preserve_order: the shards, in manifest order, hold the input's queries in input order
    qids = [q for s in shards for q in pq.read_table(batch_parquet / s, columns=["query_id"])["query_id"].to_pylist()]
    assert qids == [r["id"] for r in records[:QUERIES]]


@integration
def test_jsonl_input_gives_the_parquet_output(serve_session, bundle_a, jsonl, batch_parquet, tmp_path) -> None:
    from cotrr_ray.batch.pipeline import run

    run(BatchOptions(str(bundle_a), str(jsonl), str(tmp_path / "out"), batch_size=16, actors=1, queries_per_shard=20))
    assert_same_rows(rows(tmp_path / "out"), rows(batch_parquet))


@integration
def test_s3_input_output_and_an_alias_bundle(serve_session, s3_bucket, bundle_a, jsonl, batch_parquet) -> None:
    """Input, output and the registry (`<registry>/<name>@<alias>`) all on the loopback S3 server."""
    from cotrr_ray.batch.pipeline import run

    root = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    registry = Registry(f"{root}/registry")
    registry.publish(bundle_a, "batch")
    registry.set_alias("batch", "production", read_meta(bundle_a).bundle_id)
    convert(jsonl, f"{root}/dataset", window=8, queries_per_shard=30)
    manifest = run(
        BatchOptions(f"{root}/registry/batch@production", f"{root}/dataset", f"{root}/out", batch_size=16, actors=1)
    )
    assert manifest["bundle_uri"] == registry.bundle_uri("batch", read_meta(bundle_a).bundle_id)  # alias resolved once
    assert_same_rows(rows(f"{root}/out"), rows(batch_parquet))


@integration
def test_bad_rows_fail_the_run_with_the_readers_message_and_no_manifest(
    serve_session, bundle_a, jsonl, tmp_path
) -> None:
    from cotrr_ray.batch.pipeline import run

    bad_jsonl = tmp_path / "bad.jsonl"
    lines = jsonl.read_text().splitlines()
    rec = json.loads(lines[40])
    rec["candidates"][2]["features"]["visual"] = [0.0] * 7
    bad_jsonl.write_text("\n".join([*lines[:40], json.dumps(rec), *lines[41:]]) + "\n")
    with pytest.raises(DataError) as expected:
        read_jsonl(bad_jsonl, IMAGE_SEARCH_SPEC, window=8, require_labels=False)
    with pytest.raises(DataError) as got:
        run(BatchOptions(str(bundle_a), str(bad_jsonl), str(tmp_path / "out1")))
    assert str(got.value) == str(expected.value) and ":41:" in str(got.value)
    assert not (tmp_path / "out1" / MANIFEST).exists()

    # A hand-assembled Parquet dataset (the converter never writes one) with a NaN feature in its
    # last shard: the footers are fine, so the error comes from an actor, unwrapped to the reader's.
    lists = read_jsonl(jsonl, IMAGE_SEARCH_SPEC, window=8)
    lists[50].features["visual"][1, 3] = np.nan
    write_dataset(lists, tmp_path / "nan", IMAGE_SEARCH_SPEC, window=8, queries_per_shard=20)
    with pytest.raises(DataError) as reader:
        read_parquet_records(tmp_path / "nan", IMAGE_SEARCH_SPEC, window=8)
    with pytest.raises(DataError) as got:
        run(BatchOptions(str(bundle_a), str(tmp_path / "nan"), str(tmp_path / "out2"), queries_per_shard=10))
    assert "part-00002.parquet" in str(got.value)
    tail = str(reader.value).split(": row ")[1].split(": ", 1)[1]  # query, field, message
    assert str(got.value).endswith(tail) and "candidates[1].features.visual: non-finite value" in tail
    assert not (tmp_path / "out2" / MANIFEST).exists()


@integration
def test_batch_bench_quick(serve_session, tmp_path) -> None:
    """The bench recipe end to end at smoke size (in the session's Ray): both phases measured, the
    Ray output checked against the in-process rows inside the recipe."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import batch_bench

    out = tmp_path / "batch.json"
    result = batch_bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["command"] == f"python bench/batch_bench.py --quick --json {out}"
    assert result["data"]["queries"] == 120 and result["in_process"]["lists_per_s"] > 0
    (row,) = result["ray_batch"]
    assert (
        row["actors"] == 1
        and row["lists_per_s"] > 0
        and row["of_limit"] == round(row["lists_per_s"] / result["in_process"]["lists_per_s"], 3)
    )
