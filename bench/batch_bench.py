#!/usr/bin/env python
"""Batch reranking throughput: `python -m cotrr_ray.batch` (Ray Data actors) against the in-process limit.

    python bench/batch_bench.py [--quick] [--json OUT] [--bundle URI] [--queries N] [--actors 1,2]

Phases (each a function below):
1. prepare: synthetic lists (`cotrr_ray.data.synthetic`, 20-32 candidates, features on the first 20)
   converted to a Parquet dataset; the bundle (`--bundle`, else a tiny one: see kit/bundles.py);
2. in_process: the limit, the same lists through the same core (`BatchReranker`, one process, one
   torch thread, the same batch size), reading the same Parquet batches; lists/s of the whole loop
   (decode, features, model, calibration, order) after the bundle is loaded;
3. ray_batch: `cotrr_ray.batch.pipeline.run` on a fresh local Ray (`num_cpus` = the machine's), for
   each actor count (each actor min(1, (CPUs - 1) / actors) CPUs: one CPU stays for the read and
   write tasks, without which a fixed pool deadlocks them): lists/s over the pipeline (read -> actors -> shard writes -> manifest), and the
   Ray start apart. Output rows are checked against the in-process rows (same order, same ids).

Lists/s = queries / seconds. On the 2-vCPU development VM one actor already has a CPU's worth of
Ray's own work beside it (reads, shard writes, the driver), so the ratio to the limit is the point.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

from kit.bundles import prepare_bundle  # noqa: E402
from kit.cluster import init_local_ray  # noqa: E402
from kit.machine import loadavg, machine_info, say  # noqa: E402
from kit.report import bench_parser, jsonable, write_json  # noqa: E402

from cotrr_ray.batch.rerank import BatchJob, BatchOptions, BatchReranker, read_results  # noqa: E402
from cotrr_ray.bundles.bundle import read_meta  # noqa: E402
from cotrr_ray.data.convert import convert  # noqa: E402
from cotrr_ray.data.parquet import open_parquet_dataset  # noqa: E402
from cotrr_ray.data.synthetic import generate  # noqa: E402

BATCH_SIZE = 256


def prepare(workdir: Path, queries: int, bundle: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    jsonl = generate(workdir / "lists.jsonl", queries=queries, seed=7, progress=False)
    manifest = convert(jsonl, workdir / "dataset", window=20, queries_per_shard=max(1, queries // 4))
    bundle_dir = prepare_bundle(bundle, workdir)
    meta = read_meta(bundle_dir)
    say(f"prepared {manifest['queries']} queries ({manifest['candidates']} candidates), bundle {meta.bundle_id}")
    return {
        "dataset": str(workdir / "dataset"),
        "bundle": str(bundle_dir),
        "queries": manifest["queries"],
        "candidates": manifest["candidates"],
        "bundle_id": meta.bundle_id,
        "top_m": meta.top_m,
        "prepare_s": round(time.perf_counter() - t0, 2),
    }


def in_process(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The same core over the same Parquet batches, one process, one torch thread."""
    meta = read_meta(data["bundle"])
    ds = open_parquet_dataset(data["dataset"], meta.spec)
    job = BatchJob(data["bundle"], meta.bundle_id, meta.spec, meta.top_m, ds.window, None)
    t0 = time.perf_counter()
    reranker = BatchReranker(job, threads=1)
    t1 = time.perf_counter()
    import pyarrow as pa

    rows: list[dict] = []
    for batch in ds.iter_batches(batch_size=BATCH_SIZE):
        rows += reranker(pa.Table.from_batches([batch])).to_pylist()
    t2 = time.perf_counter()
    out = {"load_s": round(t1 - t0, 3), "seconds": round(t2 - t1, 3), "lists_per_s": round(len(rows) / (t2 - t1), 1)}
    say(f"in-process limit: {out['lists_per_s']} lists/s ({len(rows)} lists in {out['seconds']} s)")
    return out, rows


def ray_batch(data: dict[str, Any], workdir: Path, actors: list[int], reference: list[dict]) -> list[dict[str, Any]]:
    """`run` on one fresh local Ray, once per actor count; each output checked against `reference`."""
    import os

    import ray

    from cotrr_ray.batch.pipeline import run

    ours = not ray.is_initialized()  # the smoke test runs inside the test session's Ray
    init_s = init_local_ray(os.cpu_count() or 2) if ours else 0.0
    cpus = ray.cluster_resources()["CPU"]
    results = []
    try:
        for n in actors:
            out = workdir / f"out-{n}"
            t0 = time.perf_counter()
            # One CPU stays for Ray Data's read and write tasks (`run` refuses a pool that takes them all).
            per_actor = min(1.0, (cpus - 1) / n)
            opts = BatchOptions(data["bundle"], data["dataset"], str(out), batch_size=BATCH_SIZE, actors=n)
            manifest = run(dataclasses.replace(opts, cpus_per_actor=per_actor))
            wall = time.perf_counter() - t0
            got = read_results(str(out))[1].to_pylist()
            if [(r["query_id"], r["ids"]) for r in got] != [(r["query_id"], r["ids"]) for r in reference]:
                raise AssertionError(f"{n} actors: the batch output differs from the in-process rows")
            pipeline_s = manifest["timings"]["pipeline_s"]
            row = {
                "actors": n,
                "cpus_per_actor": per_actor,
                "batch_size": BATCH_SIZE,
                "pipeline_s": pipeline_s,
                "wall_s": round(wall, 3),
                "lists_per_s": round(manifest["queries"] / pipeline_s, 1),
                "shards": len(manifest["shards"]),
                "loadavg_after": loadavg(),
            }
            say(f"ray batch, {n} actor(s): {row['lists_per_s']} lists/s ({pipeline_s} s pipeline)")
            results.append(row)
    finally:
        if ours:
            ray.shutdown()
    return [{"ray_init_s": round(init_s, 2)}, *results]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench_parser(__doc__, quick="120 queries, 1 actor (smoke)", json="result JSON", png="unused")
    p.add_argument("--bundle", help="bundle dir or registry URI (default: demo@production, else a tiny one)")
    p.add_argument("--queries", type=int, default=4000)
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    args = p.parse_args(argv)
    queries = 120 if args.quick else args.queries
    actors = [1] if args.quick else [int(x) for x in args.actors.split(",")]
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    try:
        result: dict[str, Any] = {
            "command": "python " + " ".join(["bench/batch_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_info(),
            "loadavg_before": loadavg(),
        }
        data = prepare(workdir, queries, args.bundle)
        limit, reference = in_process(data)
        runs = ray_batch(data, workdir, actors, reference)
        result.update(data=data, in_process=limit, ray_init_s=runs[0]["ray_init_s"], ray_batch=runs[1:])
        for row in result["ray_batch"]:
            row["of_limit"] = round(row["lists_per_s"] / limit["lists_per_s"], 3)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        if args.json:
            write_json(jsonable(result), Path(args.json), indent=1, newline=True)
            say(f"wrote {args.json}")
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
