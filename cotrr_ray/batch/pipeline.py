"""The batch wing's Ray shell: a whole dataset through `BatchReranker` actors with Ray Data.

    read (ray.data.read_parquet of the manifest's shards, or the JSONL reader's tables)
      -> map_batches(BatchReranker, ActorPoolStrategy(size=actors), batch_size=queries)   # model once per actor
      -> map_batches(write_results_shard, batch_size=queries_per_shard)                   # atomic shards
      -> the driver writes _manifest.json last

Everything that decides a result is Ray-free (`cotrr_ray.batch.rerank`); this module only wires it.
Order is preserved (`preserve_order`), so the manifest lists the shards in input order and two runs
over the same input write the same rows in the same order.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.data

from cotrr_ray.batch.rerank import (
    BatchJob,
    BatchOptions,
    BatchReranker,
    InputSource,
    jsonl_tables,
    options_record,
    prepare,
    write_results_manifest,
    write_results_shard,
)

WRITE_CPUS = 0.25  # a shard write is I/O: it should not hold a whole CPU slot the actors could use


def _write_shard(table: Any, output: str) -> dict[str, list]:
    entry = write_results_shard(table, output)
    return {k: [v] for k, v in entry.items()}


def read_input(source: InputSource, job: BatchJob) -> ray.data.Dataset:
    if source.format == "parquet":
        ds = source.dataset
        # The manifest's shards, never a directory listing (a stale or unfinished shard is not data).
        return ray.data.read_parquet(ds.paths, filesystem=ds.filesystem, include_paths=True)
    # JSONL: the readers' validator runs here, on the driver (line-numbered errors, the duplicate-id
    # check over the whole file); its tables go to the object store, so any node's actors can read them.
    refs = [ray.put(t) for t in jsonl_tables(source.uri, job.spec, job.window)]
    return ray.data.from_arrow_refs(refs)


def run(opts: BatchOptions) -> dict[str, Any]:
    """Rerank `opts.input` into `opts.output`; returns the manifest (with the run's timings)."""
    job, source, out = prepare(opts)
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # attaches to RAY_ADDRESS (set by `ray job submit`) or a running cluster, else starts one
    cpus = ray.cluster_resources().get("CPU", 0)
    if opts.actors * opts.cpus_per_actor > cpus - 1:
        # A fixed pool that takes every CPU starves the read and write tasks (measured: a 2-CPU
        # cluster with 2 actors x 1 CPU never finished); fail at once instead of hanging.
        raise ValueError(
            f"{opts.actors} actors x {opts.cpus_per_actor} CPUs leave less than 1 of the cluster's {cpus:g} CPUs "
            "for reading and writing; use fewer actors or a smaller --cpus-per-actor"
        )
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.raise_original_map_exception
    ctx.execution_options.preserve_order = True
    # The reader's own exception (DataError), not Ray Data's UserCodeException around it: `unwrap`
    # turns it back into the message a reader gives for the same file.
    ctx.raise_original_map_exception = True
    try:
        t_ready = time.perf_counter()
        scored = read_input(source, job).map_batches(
            BatchReranker,
            fn_constructor_kwargs={"job": job, "threads": max(1, int(opts.cpus_per_actor))},
            batch_size=opts.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=opts.actors),
            num_cpus=opts.cpus_per_actor,
        )
        written = scored.map_batches(
            _write_shard,
            fn_kwargs={"output": out.uri},
            batch_size=opts.queries_per_shard,
            batch_format="pyarrow",
            num_cpus=WRITE_CPUS,
        )
        shards = [
            {"path": str(r["path"]), "queries": int(r["queries"]), "bytes": int(r["bytes"])}
            for r in written.iter_rows()
        ]
    except Exception as e:
        raise unwrap(e) from None
    finally:
        ctx.execution_options.preserve_order, ctx.raise_original_map_exception = saved
    t_done = time.perf_counter()
    timings = {"ray_init_s": round(t_ready - t0, 3), "pipeline_s": round(t_done - t_ready, 3)}
    return write_results_manifest(out, job, source, shards, {"options": options_record(opts), "timings": timings})


def unwrap(error: BaseException) -> BaseException:
    """The user-code exception inside Ray's wrappers (RayTaskError, UserCodeException), so a bad
    input fails with the readers' own message rather than a remote traceback."""
    from cotrr_ray.bundles.bundle import BundleError
    from cotrr_ray.data.readers import DataError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ray.exceptions.RayTaskError):  # also an instance of its cause's class: look inside
            seen = seen.cause
        elif isinstance(seen, DataError | BundleError):
            # Ray Data appends its retry note to the exception's message ("\nFailed to apply UDF
            # transform after 1/1 attempts ..."); the readers' messages are one line, so cut it off.
            message = str(seen.args[0]) if seen.args else str(seen)
            head, note, _ = message.partition("\nFailed to ")
            return type(seen)(head) if note else seen
        else:
            seen = seen.__cause__
    return error
