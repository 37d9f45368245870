#!/usr/bin/env python
"""Training benchmark: the Ray Train job against the plain PyTorch loop, same data, model and run.

    python bench/train_bench.py [--quick] [--json OUT] [--png OUT] [--epochs N] [--gpu-only]

CPU (always):
- plain PyTorch: `cotrr_ray.training.loop.fit` with `TorchContext` in this process (one torch thread, the
  setting of a Ray worker), the training config of configs/demo.yaml (bf16 autocast);
- the Ray Train job at 1 and 2 workers: the TorchTrainer of `cotrr_ray.training.job.run_ray_train` (same
  ScalingConfig / RunConfig / checkpoint per epoch / gloo), each worker streaming its shard through
  the job's Ray Data path (`cotrr_ray.training.ingest`: Parquet -> split -> `ShardBatches`), on a fresh local Ray
  (`ray.init(address="local")`, never someone else's cluster);
- bf16 autocast on vs off (plain loop).

Each run trains a fixed number of epochs (early stopping off) and time-stamps every per-epoch
report: wall time per epoch = between consecutive reports (training, validation, checkpoint);
the first epoch is left out of the steady-state figures (warm-up). Start-up is reported apart:
`ray.init` (cluster start) and TorchTrainer.fit() -> first line of the worker loop (worker group,
process group). Ray overhead per epoch at 1 worker = steady wall per epoch (Ray) / (plain) - 1.

GPU (when `torch.cuda.is_available()`, through plain PyTorch only, no Ray import, so it also runs on
a GPU machine without Ray): fp32 vs bf16 vs fp16 + GradScaler (loss curves overlaid in the plot:
AMP must not change where training converges), and torch.compile off vs on. Skipped with a note
when there is no CUDA device (the 2-core development machine has none).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]  # cotrr_ray and bench/kit

import torch  # noqa: E402
from kit.cluster import init_local_ray  # noqa: E402
from kit.machine import calm_run, loadavg, run_header, say  # noqa: E402
from kit.report import bench_parser, save_figure, write_outputs  # noqa: E402

from cotrr_ray.config import TrainConfig  # noqa: E402
from cotrr_ray.training.loop import fit  # noqa: E402
from cotrr_ray.training.prepare import PreparedData, prepare_data  # noqa: E402
from cotrr_ray.training.torchrun import TorchContext  # noqa: E402

# ============================================================================ timed epoch reports


def timing_record(metrics: dict[str, float], t_before: float, t_after: float) -> dict[str, Any]:
    """One per-epoch report with its wall-clock bounds (what `summarise` reads)."""
    return {**metrics, "t_before_report": t_before, "t_after_report": t_after}


class TimedTorchContext(TorchContext):
    """`TorchContext` that time-stamps each per-epoch report (and keeps no checkpoints around)."""

    def __init__(self, checkpoint_dir: str | Path, use_gpu: bool = False):
        super().__init__(checkpoint_dir, use_gpu=use_gpu)
        self.t_start = time.time()
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        t0 = time.time()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            super().report(metrics, state)  # writes the epoch checkpoint, like the Ray job does
        self.reports.append(timing_record(metrics, t0, time.time()))


class TimingLog:
    """`on_report` hook of `cotrr_ray.training.job._worker_loop`: rank 0 appends one JSON line per epoch
    report (its time stamps and when the worker loop started). Picklable: it travels in the loop config."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def __call__(self, ctx: Any, metrics: dict[str, float], t_before: float, t_after: float) -> None:
        if ctx.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({**timing_record(metrics, t_before, t_after), "t_loop_start": ctx.t_start}) + "\n")


# ============================================================================ runs


def summarise(reports: list[dict[str, Any]], t_start: float, n_train: int, world: int) -> dict[str, Any]:
    """Per-epoch rows and steady-state figures (epochs >= 1; epoch 0 includes warm-up)."""
    epochs = []
    prev = t_start
    for r in reports:
        epochs.append(
            {
                "epoch": int(r["epoch"]),
                "wall_s": round(r["t_after_report"] - prev, 4),
                "train_loop_s": round(r["epoch_s"], 4),
                "report_s": round(r["t_after_report"] - r["t_before_report"], 4),
                "train_loss": round(r["train_loss"], 6),
                "val_ndcg@10": round(r["val_window_ndcg@10"], 6),
            }
        )
        prev = r["t_after_report"]
    steady = epochs[1:] or epochs
    wall = statistics.median(e["wall_s"] for e in steady)
    loop = statistics.median(e["train_loop_s"] for e in steady)
    return {
        "epochs": epochs,
        "epoch_wall_s": round(wall, 4),
        "epoch_train_loop_s": round(loop, 4),
        "report_s": round(statistics.median(e["report_s"] for e in steady), 4),
        "samples_per_s": round(n_train / wall, 2),  # lists (queries) per second, all workers together
        "train_loop_samples_per_s": round(n_train / loop, 2),
        "first_epoch_wall_s": epochs[0]["wall_s"],
        "final_train_loss": epochs[-1]["train_loss"],
        "final_val_ndcg@10": epochs[-1]["val_ndcg@10"],
        "world_size": world,
    }


def bench_cfg(
    base: TrainConfig,
    *,
    epochs: int,
    amp: str | None = None,
    compile_: bool | None = None,
    use_gpu: bool = False,
    num_workers: int | None = None,
) -> TrainConfig:
    optim = base.optim.model_copy(
        update={
            "max_epochs": epochs,
            "patience": epochs + 1,
            **({"amp": amp} if amp else {}),
            **({"compile": compile_} if compile_ is not None else {}),
        }
    )
    scaling = base.scaling.model_copy(
        update={
            "use_gpu": use_gpu,
            "max_failures": 0,
            **({"num_workers": num_workers} if num_workers is not None else {}),
        }
    )
    return base.model_copy(update={"optim": optim, "scaling": scaling})


def run_plain(cfg: TrainConfig, data: PreparedData, *, use_gpu: bool = False) -> dict[str, Any]:
    """`cotrr_ray.training.loop.fit` in this process (TorchContext), no Ray."""
    with tempfile.TemporaryDirectory(prefix="train-bench-plain-") as d:
        ctx = TimedTorchContext(d, use_gpu=use_gpu)
        threads = torch.get_num_threads()
        t0 = time.time()
        try:
            fit(cfg, data.model_config, data.padded["train"], data.padded["validation"], ctx)
        finally:
            torch.set_num_threads(threads)
        out = summarise(ctx.reports, t0, len(data.padded["train"]), 1)
        out["fit_s"] = round(time.time() - t0, 3)
        out["startup_s"] = 0.0
        out["amp"] = cfg.optim.amp
        out["compile"] = cfg.optim.compile
        out["device"] = str(ctx.device)
        return out


def run_ray(cfg: TrainConfig, data: Any, workdir: Path, num_workers: int) -> dict[str, Any]:
    """The TorchTrainer of `cotrr_ray.training.job.run_ray_train` (`cotrr_ray.training.job.make_trainer`)
    on the job's Ray Data path (`data`: `cotrr_ray.training.ingest.TrainingData`), timed."""
    import ray

    from cotrr_ray.training.job import _worker_loop, make_trainer

    mod = sys.modules[TimingLog.__module__]
    if mod.__name__ != "__main__":  # imported (tests): ship the hook by value, workers cannot import bench/
        ray.cloudpickle.register_pickle_by_value(mod)
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": num_workers})})
    log = workdir / f"ray-{num_workers}w-{time.time_ns()}.jsonl"
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "model_config": data.model_config.to_dict(),
        "data": data.loop_config(),
        "on_report": TimingLog(log),
    }
    trainer = make_trainer(
        cfg,
        _worker_loop,
        loop_config,
        name=f"train-bench-{num_workers}w-{time.time_ns()}",
        storage_path=workdir / "ray_results",
        max_failures=0,
        datasets=data.datasets(),
    )
    t0 = time.time()
    result = trainer.fit()
    fit_s = time.time() - t0
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    t_loop_start = reports[0]["t_loop_start"]
    out = summarise(reports, t_loop_start, data.counts["train"], num_workers)
    out["startup_s"] = round(t_loop_start - t0, 3)  # fit() -> worker loop running (actors, process group)
    out["shutdown_s"] = round(t0 + fit_s - reports[-1]["t_after_report"], 3)  # last report -> fit() returns
    out["fit_s"] = round(fit_s, 3)
    out["amp"] = cfg.optim.amp
    out["device"] = "cpu"
    return out


def gpu_section(base: TrainConfig, data: PreparedData, epochs: int) -> dict[str, Any]:
    """fp32 / bf16 / fp16+GradScaler loss curves and torch.compile on/off, plain PyTorch on CUDA."""
    if not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device visible to torch (torch.cuda.is_available() is False); run "
            "`python bench/train_bench.py --gpu-only` on a GPU machine (Ray not needed)"
        }
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "runs": {}}
    for name, amp, comp in (
        ("fp32", "none", False),
        ("bf16", "bf16", False),
        ("fp16+GradScaler", "fp16", False),
        ("bf16+compile", "bf16", True),
    ):
        cfg = bench_cfg(base, epochs=epochs, amp=amp, compile_=comp, use_gpu=True)
        say(f"GPU {name}: {epochs} epochs")
        out["runs"][name] = run_plain(cfg, data, use_gpu=True)
        r = out["runs"][name]
        say(
            f"  {r['samples_per_s']:.0f} lists/s, final loss {r['final_train_loss']:.4f}, "
            f"val nDCG@10 {r['final_val_ndcg@10']:.4f}"
        )
    runs = out["runs"]
    ref = runs["fp32"]["final_val_ndcg@10"]
    out["amp_val_ndcg_delta_vs_fp32"] = {k: round(v["final_val_ndcg@10"] - ref, 4) for k, v in runs.items()}
    out["compile_speedup"] = round(runs["bf16+compile"]["samples_per_s"] / runs["bf16"]["samples_per_s"], 3)
    return out


# ============================================================================ report


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nmachine: {result['machine']['cpu_model']} x{result['machine']['logical_cpus']}, "
        f"load before {result['load']['before']} after {result['load']['after']}"
    )
    print(
        f"data: {result['data']['train_lists']} training lists (queries), model {result['data']['model']}, "
        f"{result['settings']['epochs']} epochs per run, batch {result['settings']['batch_size']}"
    )
    head = (
        f"{'run':<22}{'epoch s':>9}{'loop s':>9}{'report s':>10}{'lists/s':>9}{'start s':>9}{'fit s':>8}"
        f"{'loss':>8}{'nDCG@10':>9}{'other':>7}"
    )
    print(head)
    for name, r in result["cpu"].items():
        print(
            f"{name:<22}{r['epoch_wall_s']:>9.3f}{r['epoch_train_loop_s']:>9.3f}{r['report_s']:>10.3f}"
            f"{r['samples_per_s']:>9.1f}{r['startup_s']:>9.2f}{r['fit_s']:>8.1f}{r['final_train_loss']:>8.4f}"
            f"{r['final_val_ndcg@10']:>9.4f}{r.get('foreign_cores', float('nan')):>7.2f}"
        )
    print("(other = cores used by processes that are not this benchmark's during the run)")
    if "ray_init_s" in result:
        print(f"cluster start (ray.init): {result['ray_init_s']:.2f} s")
    for k, v in result.get("ratios", {}).items():
        print(f"{k}: {v}")
    g = result.get("gpu", {})
    if "skipped" in g:
        print(f"GPU section skipped: {g['skipped']}")
    else:
        for name, r in g.get("runs", {}).items():
            print(
                f"GPU {name:<18}{r['epoch_wall_s']:>9.3f}{r['samples_per_s']:>9.1f} loss {r['final_train_loss']:.4f} "
                f"nDCG {r['final_val_ndcg@10']:.4f}"
            )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu_runs = result.get("gpu", {}).get("runs", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cpu = result["cpu"]
    names = list(cpu)
    axes[0].bar(names, [cpu[n]["epoch_train_loop_s"] for n in names], label="training loop")
    axes[0].bar(
        names,
        [cpu[n]["epoch_wall_s"] - cpu[n]["epoch_train_loop_s"] for n in names],
        bottom=[cpu[n]["epoch_train_loop_s"] for n in names],
        label="validation + report/checkpoint",
    )
    axes[0].set_ylabel("seconds per epoch (steady state)")
    axes[0].set_title("epoch time (CPU)")
    axes[0].tick_params(axis="x", rotation=20, labelsize=8)
    axes[0].legend(fontsize=7)
    axes[1].bar(names, [cpu[n]["samples_per_s"] for n in names], color="tab:green")
    axes[1].set_ylabel("training lists / s (all workers)")
    axes[1].set_title("throughput (CPU)")
    axes[1].tick_params(axis="x", rotation=20, labelsize=8)
    for n in names:
        axes[2].plot(
            [e["epoch"] for e in cpu[n]["epochs"]],
            [e["train_loss"] for e in cpu[n]["epochs"]],
            "-o",
            ms=3,
            label=f"CPU {n}",
        )
    for n, r in gpu_runs.items():
        axes[2].plot(
            [e["epoch"] for e in r["epochs"]], [e["train_loss"] for e in r["epochs"]], "--s", ms=3, label=f"GPU {n}"
        )
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("training loss")
    title = "loss curves" + ("" if gpu_runs else " (GPU section skipped: no CUDA)")
    axes[2].set_title(title)
    axes[2].legend(fontsize=7)
    m = result["machine"]
    save_figure(
        fig, path, f"cotrr-ray training: plain PyTorch vs Ray Train — {m['logical_cpus']} CPUs {m['cpu_model'][:40]}"
    )


# ============================================================================ main


def load_data(args: argparse.Namespace) -> tuple[TrainConfig, PreparedData]:
    from cotrr_ray.training.job import resolve_data_path

    overrides = list(args.override or [])
    if args.queries:
        overrides.append(f"data.generate.queries={args.queries}")
    cfg = TrainConfig.from_yaml(args.config, overrides)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": str(REPO / cfg.data.cache_dir)})})
    path = resolve_data_path(cfg, say)
    t0 = time.perf_counter()
    data = prepare_data(cfg, path)
    say(f"data ready in {time.perf_counter() - t0:.1f} s: { {k: len(v) for k, v in data.padded.items()} }")
    return cfg, data


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe: header and data, the CPU runs (plain PyTorch, Ray Train), their ratios, the GPU section."""
    t_start = time.perf_counter()
    result: dict[str, Any] = run_header()
    base, data = load_data(args)
    describe_run(result, args, base, data)
    result["cpu"] = {}
    if not args.gpu_only:
        cfg = bench_cfg(base, epochs=args.epochs)
        other = run_plain_pair(result["cpu"], args, base, cfg, data)
        if not args.no_ray:
            run_ray_workers(result, args, cfg, data)
        result["ratios"] = cpu_ratios(result["cpu"], cfg.optim.amp, other)
        overhead = result["ratios"].get("ray_overhead_per_epoch_1_worker")
        ingest = result["ratios"].get("ray_data_vs_in_memory_lists_per_s_1_worker")
        result["targets"] = {
            "ray_overhead_per_epoch_1_worker<=10%": None if overhead is None else overhead <= 0.10,
            "ray_data_vs_in_memory_lists_per_s_1_worker>=0.9": None if ingest is None else ingest >= 0.9,
        }
    result["gpu"] = gpu_section(base, data, args.gpu_epochs) if not args.no_gpu else {"skipped": "--no-gpu"}
    result["load"]["after"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def describe_run(result: dict[str, Any], args: argparse.Namespace, base: TrainConfig, data: PreparedData) -> None:
    mc = data.model_config
    result["data"] = {
        "train_lists": len(data.padded["train"]),
        "validation_lists": len(data.padded["validation"]),
        "model": f"d_model {mc.d_model}, {mc.n_layers} layers, {mc.n_heads} heads, M={mc.max_list_len}",
        "config": args.config,
    }
    result["settings"] = {
        "epochs": args.epochs,
        "batch_size": base.optim.batch_size,
        "amp": base.optim.amp,
        "torch_threads": base.scaling.torch_threads,
        "quick": args.quick,
    }


def run_plain_pair(
    cpu: dict[str, Any], args: argparse.Namespace, base: TrainConfig, cfg: TrainConfig, data: PreparedData
) -> str:
    """Plain PyTorch with the config's autocast and with the other one (bf16 <-> none); returns the other."""
    say(f"plain PyTorch ({cfg.optim.amp}): {args.epochs} epochs")
    cpu[f"plain {cfg.optim.amp}"] = calm_run(lambda: run_plain(cfg, data), max_foreign=args.max_foreign)
    say(f"  {cpu[f'plain {cfg.optim.amp}']['epoch_wall_s']:.3f} s/epoch")
    other = "none" if cfg.optim.amp != "none" else "bf16"
    say(f"plain PyTorch ({other}): {args.epochs} epochs")
    cpu[f"plain {other}"] = calm_run(
        lambda: run_plain(bench_cfg(base, epochs=args.epochs, amp=other), data), max_foreign=args.max_foreign
    )
    say(f"  {cpu[f'plain {other}']['epoch_wall_s']:.3f} s/epoch")
    return other


def run_ray_workers(result: dict[str, Any], args: argparse.Namespace, cfg: TrainConfig, data: PreparedData) -> None:
    """The Ray Train job at each worker count, on one fresh local Ray."""
    import ray
    import ray.data

    from cotrr_ray.training.ingest import open_training_data, parquet_source
    from cotrr_ray.training.job import resolve_data_path

    workdir = Path(tempfile.mkdtemp(prefix="train-bench-"))
    result["ray_init_s"] = round(init_local_ray(args.num_cpus), 3)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False  # as job.run sets them
    try:
        t0 = time.perf_counter()
        tdata = open_training_data(cfg, parquet_source(cfg, resolve_data_path(cfg, say), say))
        result["ray_data_prepare_s"] = round(time.perf_counter() - t0, 3)
        if tdata.counts["train"] != len(data.padded["train"]):  # the same hash split both ways
            raise RuntimeError(f"Ray Data train split {tdata.counts['train']} != in-memory {len(data.padded['train'])}")
        for w in args.workers:
            say(f"Ray Train, {w} worker(s) ({cfg.optim.amp}): {args.epochs} epochs")
            r = result["cpu"][f"ray {w}w {cfg.optim.amp}"] = calm_run(
                lambda w=w: run_ray(cfg, tdata, workdir, w), max_foreign=args.max_foreign
            )
            say(f"  {r['epoch_wall_s']:.3f} s/epoch, start-up {r['startup_s']:.1f} s, fit {r['fit_s']:.1f} s")
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_ratios(cpu: dict[str, Any], amp: str, other: str) -> dict[str, Any]:
    """Ray overhead and scaling vs the plain loop; bf16 vs fp32 on CPU."""
    plain = cpu[f"plain {amp}"]
    ratios = {}
    for name, r in cpu.items():
        if name.startswith("ray 1w"):
            ratios["ray_overhead_per_epoch_1_worker"] = round(r["epoch_wall_s"] / plain["epoch_wall_s"] - 1, 4)
            ratios["ray_overhead_train_loop_1_worker"] = round(
                r["epoch_train_loop_s"] / plain["epoch_train_loop_s"] - 1, 4
            )
            ratios["ray_startup_s_1_worker"] = r["startup_s"]
            # Training lists/s per worker through Ray Data (the job's path) vs the in-memory loop.
            ratios["ray_data_vs_in_memory_lists_per_s_1_worker"] = round(r["samples_per_s"] / plain["samples_per_s"], 3)
        if name.startswith("ray 2w"):
            ratios["ray_2_workers_speedup_vs_plain"] = round(r["samples_per_s"] / plain["samples_per_s"], 3)
            ray1 = next((v for k, v in cpu.items() if k.startswith("ray 1w")), None)
            if ray1:
                ratios["ray_2_workers_vs_1_worker"] = round(r["samples_per_s"] / ray1["samples_per_s"], 3)
    if f"plain {other}" in cpu:
        bf, fp = (plain, cpu[f"plain {other}"]) if amp == "bf16" else (cpu[f"plain {other}"], plain)
        ratios["cpu_bf16_speedup_vs_fp32"] = round(bf["samples_per_s"] / fp["samples_per_s"], 3)
        ratios["cpu_bf16_val_ndcg_delta"] = round(bf["final_val_ndcg@10"] - fp["final_val_ndcg@10"], 4)
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        quick="small data (300 queries), 3 epochs, Ray at 1 worker only",
        json="default bench/results/train.json (quick: train_quick.json)",
        png="default: the JSON path with .png",
    )
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    p.add_argument("--queries", type=int, default=None, help="synthetic queries (default: the config's; quick 300)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 6; quick 3)")
    p.add_argument("--gpu-epochs", type=int, default=None, help="epochs per GPU run (default 8; quick 3)")
    p.add_argument("--workers", default=None, help="Ray Train worker counts (default 1,2; quick 1)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--no-ray", action="store_true", help="plain PyTorch only")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU section (plain PyTorch, no Ray import)")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="run again when processes that are not ours used more cores than this (shared machines); <0: off",
    )
    p.add_argument("override", nargs="*", help="TrainConfig overrides, e.g. optim.batch_size=64")
    a = p.parse_args(argv)
    q = a.quick
    a.queries = a.queries or (300 if q else None)
    a.epochs = a.epochs or (3 if q else 6)
    a.gpu_epochs = a.gpu_epochs or (3 if q else 8)
    a.workers = [int(x) for x in (a.workers or ("1" if q else "1,2")).split(",")]
    a.max_foreign = None if a.max_foreign < 0 else a.max_foreign
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(args)
    print_table(result)
    default = "bench/results/train_quick.json" if args.quick else "bench/results/train.json"
    write_outputs(result, args.json or REPO / default, args.png, plot)
    return result


if __name__ == "__main__":
    main()
