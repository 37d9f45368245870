#!/usr/bin/env python
"""Training at scale: peak memory of the driver and of each Train worker at 1x, 3x and 10x the data.

    python bench/ingest_bench.py [--quick] [--json OUT] [--png OUT] [--base-queries N] [--scales 1 3 10]

The recipe, per scale (each in a fresh subprocess, so a process's peak RSS is that run's alone):
1. generate: synthetic Parquet shards (the default image-search spec, ~85 KB a query), written by
   Ray tasks (`cotrr_ray.data.synthetic.generate_parquet(use_ray=True)`), outside the measured run;
2. train: the training job itself (`cotrr_ray.training.job.run`) on that dataset (`data.format:
   parquet`): Ray Data reads, splits, the normaliser's aggregation, 2 Train workers streaming their
   shards (`data.cache_max_mb: 0`, so no scale is cached in the object store), calibration and
   test scoring by Ray Data batch inference, evaluation and publishing;
3. measure: a sampler thread reads, every 0.2 s from /proc, the peak RSS (VmHWM) and the private
   resident memory (RssAnon, its largest sample) of the driver, of each RayTrainWorker and of Ray's
   other worker processes (Ray Data's read and map tasks and actors, the split coordinator). RSS
   counts the object store's shared pages a process has read zero-copy (blocks stay mapped while
   the store holds them), so the private figure is the one a process's own buffers set.

Targets (from the issue): the driver's peak flat (10x / 1x <= 1.2) and far below the dataset's size
on disk; the workers' peaks set by batch and prefetch settings (flat too), not by the dataset. A
worker's data memory is its local shuffle buffer, which at a compaction briefly holds about twice
`data.shuffle_buffer_queries` queries' model inputs, plus blocks of `data.block_queries` in flight;
the bench's buffer (300) is below the 1x shard so that every scale measures the settings. A
worker's RSS also counts the object store's pages it has read zero-copy (RssShmem), bounded by
the store's size (the bench's store, 1 GiB, is smaller than the 10x dataset).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

from kit.machine import descendants, loadavg, run_header, say  # noqa: E402
from kit.report import bench_parser, save_figure, write_outputs  # noqa: E402

EPOCHS = 1


def memory_mb(pid: int | str) -> dict[str, float] | None:
    """A process's peak resident set (VmHWM) and its private resident memory now (RssAnon), MiB;
    None when it is gone. The two differ by the shared pages a process maps: Ray's object store
    (plasma) is shared memory, and every block a worker reads zero-copy counts in its RSS while the
    store keeps those pages, though it is the store's memory (capped by Ray Data), not the worker's."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssShmem")}
    except (OSError, KeyError, ValueError):
        return None


def vm_hwm_mb(pid: int | str) -> float | None:
    m = memory_mb(pid)
    return None if m is None else m["VmHWM"]


def _title(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class PeakSampler(threading.Thread):
    """Every 0.2 s: the VmHWM of each of this process's Ray processes, grouped by what it is."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peaks: dict[int, float] = {}  # pid -> peak RSS (VmHWM), MiB
        self.private: dict[int, float] = {}  # pid -> the largest private RSS (RssAnon) sampled, MiB
        self.shared: dict[int, float] = {}  # pid -> the largest shared RSS (RssShmem: object store pages), MiB
        self.driver_private = 0.0
        self.kinds: dict[int, str] = {}  # pid -> the actor class or task it ran (the last title seen)

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in descendants(os.getpid()):  # this run's Ray only, never another cluster on the box
                title = _title(str(pid))
                if "ray::" in title:
                    mb = memory_mb(pid)
                    if mb is not None:
                        self.peaks[pid] = max(self.peaks.get(pid, 0.0), mb["VmHWM"])
                        self.private[pid] = max(self.private.get(pid, 0.0), mb["RssAnon"])
                        self.shared[pid] = max(self.shared.get(pid, 0.0), mb["RssShmem"])
                        if "IDLE" not in title:
                            self.kinds[pid] = title.split()[0]
            own = memory_mb("self")
            if own is not None:
                self.driver_private = max(self.driver_private, own["RssAnon"])
            self.stop.wait(0.2)

    def groups(self) -> dict[str, Any]:
        train = {pid for pid, kind in self.kinds.items() if "RayTrainWorker" in kind}
        workers = sorted(v for pid, v in self.peaks.items() if pid in train)
        # Ray's other workers: Ray Data's read/map tasks and actors, its split coordinator, Train's controller.
        other = [v for pid, v in self.peaks.items() if pid not in train]
        return {
            "train_workers_peak_mb": [round(v, 1) for v in workers],
            "train_workers_private_peak_mb": sorted(round(v, 1) for pid, v in self.private.items() if pid in train),
            "train_workers_shared_peak_mb": sorted(round(v, 1) for pid, v in self.shared.items() if pid in train),
            "other_ray_worker_largest_peak_mb": round(max(other), 1) if other else None,
            "ray_processes_seen": len(self.peaks),
        }


def one_scale(dataset: str, workdir: str, shuffle_buffer: int, object_store_mb: int) -> dict[str, Any]:
    """Phase train + measure, in this (fresh) process: the job on `dataset`, peaks sampled."""
    import ray

    from cotrr_ray.config import TrainConfig
    from cotrr_ray.training.job import run

    cfg = TrainConfig.from_yaml(
        REPO / "configs" / "demo.yaml",
        [
            "data.format=parquet",
            f"data.path={dataset}",
            "data.cache_max_mb=0",
            f"data.shuffle_buffer_queries={shuffle_buffer}",
            f"optim.max_epochs={EPOCHS}",
            "optim.amp=none",  # bf16 autocast is emulated on CPUs without it (7x slower here)
            "bootstrap_samples=100",
            f"output={workdir}/registry/scale",
            "alias=null",
            f"scaling.storage_path={workdir}/runs",
        ],
    )
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    published = run(cfg, say=lambda _: None)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    driver_private = sampler.driver_private
    metrics = json.loads((published.local_dir() / "metrics.json").read_text())
    out = {
        "driver_peak_mb": round(vm_hwm_mb("self") or 0.0, 1),
        "driver_private_peak_mb": round(driver_private, 1),
        **sampler.groups(),
        "job_s": round(wall, 1),
        "splits": metrics["splits"],
        "test_ndcg@10_model": metrics["headline"]["test_ndcg@10_model"],
        "train_lists_per_s_per_worker": metrics["final_epoch"].get("train_samples_per_s_per_worker"),
    }
    ray.shutdown()
    return out


def generate(path: Path, queries: int, *, use_ray: bool) -> dict[str, Any]:
    """Phase generate: the dataset at one scale (with `use_ray`, one Ray task per shard)."""
    import ray

    from cotrr_ray.data.synthetic import generate_parquet

    t0 = time.perf_counter()
    if use_ray:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    manifest = generate_parquet(path, queries=queries, shards=max(1, queries // 1000), seed=0, use_ray=use_ray)
    if use_ray:
        ray.shutdown()
    size = sum(s["bytes"] for s in manifest["shards"])
    return {
        "queries": queries,
        "shards": len(manifest["shards"]),
        "disk_mb": round(size / 2**20, 1),
        "generate_s": round(time.perf_counter() - t0, 1),
    }


def run_benchmark(args: Any) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        **run_header(),
        "settings": {
            "base_queries": args.base_queries,
            "scales": args.scales,
            "epochs": EPOCHS,
            "workers": 2,
            "shuffle_buffer_queries": args.shuffle_buffer,
            "object_store_mb": args.object_store_mb,
            "config": "configs/demo.yaml + data.format=parquet, data.cache_max_mb=0, optim.amp=none, "
            f"data.shuffle_buffer_queries={args.shuffle_buffer}",
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=args.workdir) as work:
        for scale in args.scales:
            queries = int(args.base_queries * scale)
            path = Path(work) / f"data-{queries}"
            say(f"{scale}x: generating {queries} queries")
            row = {"scale": scale, **generate(path, queries, use_ray=not args.quick)}
            say(f"  {row['disk_mb']:.0f} MB on disk; training (subprocess)")
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(path),
                    "--workdir",
                    work,
                    "--shuffle-buffer",
                    str(args.shuffle_buffer),
                    "--object-store-mb",
                    str(args.object_store_mb),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                raise RuntimeError(f"scale {scale}x failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            say(
                f"  driver {row['driver_peak_mb']:.0f} MB, workers {row['train_workers_peak_mb']} MB, job {row['job_s']:.0f} s"
            )
            result["runs"].append(row)
            for p in path.glob("*"):
                p.unlink()
    first, last = result["runs"][0], result["runs"][-1]
    result["ratios"] = {
        "driver_peak_last_over_first": round(last["driver_peak_mb"] / first["driver_peak_mb"], 3),
        "worker_peak_last_over_first": round(
            max(last["train_workers_peak_mb"]) / max(first["train_workers_peak_mb"]), 3
        ),
        "driver_private_last_over_first": round(last["driver_private_peak_mb"] / first["driver_private_peak_mb"], 3),
        "worker_private_last_over_first": round(
            max(last["train_workers_private_peak_mb"]) / max(first["train_workers_private_peak_mb"]), 3
        ),
        "driver_peak_over_disk_at_last": round(last["driver_peak_mb"] / last["disk_mb"], 3),
    }
    result["targets"] = {
        "driver_peak_flat(<=1.2x)": result["ratios"]["driver_peak_last_over_first"] <= 1.2,
        "worker_private_flat(<=1.2x)": result["ratios"]["worker_private_last_over_first"] <= 1.2,
    }
    result["load"]["after"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    x = [r["disk_mb"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, x, "k:", label="dataset on disk")
    ax.plot(x, [r["driver_peak_mb"] for r in runs], "o-", label="driver peak RSS")
    ax.plot(x, [max(r["train_workers_peak_mb"]) for r in runs], "s-", label="largest Train worker peak RSS")
    ax.plot(x, [r["driver_private_peak_mb"] for r in runs], "o--", label="driver private (RssAnon)")
    ax.plot(x, [max(r["train_workers_private_peak_mb"]) for r in runs], "s--", label="Train worker private (RssAnon)")
    if all("train_workers_shared_peak_mb" in r for r in runs):
        ax.plot(
            x, [max(r["train_workers_shared_peak_mb"]) for r in runs], "s:", label="Train worker object-store pages"
        )
    ax.set_xlabel("dataset size on disk (MB)")
    ax.set_ylabel("MB")
    ax.legend()
    save_figure(fig, path, "training job peak memory vs data size (2 Train workers, streamed)")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = bench_parser(__doc__, quick="tiny scales (a smoke run)", json="result JSON", png="plot PNG")
    p.add_argument("--base-queries", type=int, default=2000, help="queries at 1x (default: the demo's 2,000)")
    p.add_argument("--scales", type=float, nargs="+", default=[1, 3, 10])
    p.add_argument("--workdir", default=None, help="where the datasets are written (default: the temp dir)")
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=300,
        help="data.shuffle_buffer_queries (default 300: below the 1x run's shard of ~690 training queries a "
        "worker, so every scale fills it; at 1000, 1x would hold its whole shard and measure the data)",
    )
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=1024,
        help="the run's Ray object store (default 1 GiB, below the 10x dataset: a worker's RSS also counts the "
        "store's pages it has read, so the store's size bounds that part)",
    )
    p.add_argument("--one", default=None, help="internal: run the job once on this dataset, print its peaks")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_scale(args.one, args.workdir, args.shuffle_buffer, args.object_store_mb)), flush=True)
        return None
    if args.quick:
        args.base_queries, args.scales = 60, [1]  # one small run: the pipeline works, nothing is measured
    result = run_benchmark(args)
    print(json.dumps({"runs": result["runs"], "ratios": result["ratios"]}, indent=1))
    if args.json:
        write_outputs(result, args.json, args.png, plot)
    return result


if __name__ == "__main__":
    main()
