"""The choice in configs/mslr.yaml: the quality bench's selection phase on every sample query.

    python bench/mslr_tuning.py [--data FILE] [--config configs/mslr.yaml] [--json bench/results/mslr_inner_cv_tuning.json] [--quick]

Recipe (phases): read the LETOR file -> `quality_bench.select_cotrr` over all its queries (inner
grouped K-fold CV, K = `calibration.folds`, the cross-fit folds; each variant of
`quality_bench.Settings.variants` trained `max_epochs` epochs per fold and scored on its held-out fold
after every epoch; the choice is the best 3-epoch moving average of pooled inner nDCG@10) -> report:
every variant's curve, the chosen variant and epochs, and whether `--config` already holds them.

This is the same selection the bench runs inside each of its outer training sets (nested CV) and
on the whole sample for its held-out-file split, so the shipped config is what the bench's
held-out-file split trains. No query outside `--data` is read; the numbers it prints are inner-CV
scores (the only ones allowed to choose), not estimates of quality on new queries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

import quality_bench as qb  # noqa: E402
import torch  # noqa: E402
from kit.machine import basic_machine  # noqa: E402
from kit.report import write_json  # noqa: E402

from cotrr_ray.config import TrainConfig  # noqa: E402
from cotrr_ray.data.readers import file_fingerprint, letor_spec  # noqa: E402


def config_holds(cfg: TrainConfig, chosen: dict[str, Any]) -> dict[str, Any]:
    """Which chosen values `cfg` already has (variant keys and optim.max_epochs)."""
    raw = cfg.model_dump(mode="json")
    out = {}
    for key, value in {**chosen["variant"], "optim.max_epochs": chosen["epochs"]}.items():
        node = raw
        for p in key.split("."):
            node = node[p]
        out[key] = {"chosen": value, "config": node, "same": node == value}
    return out


def run(data: str | Path, config: str | Path, settings: qb.Settings, overrides: list[str], say=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(config, [*settings.model_overrides, *overrides, f"data.path={data}"])
    lists, _ = qb.read_lists(cfg, settings, data, None, 1, say)
    spec = letor_spec(cfg.data.letor_num_features)
    selection = qb.select_cotrr(cfg, spec, lists, settings, cfg.data.relevance_threshold)
    for v in selection["variants"]:
        say(
            f"  {v['name']:<32} best epoch {v['epochs']:>2}: inner nDCG@10 {v['inner_ndcg@10']:.4f} "
            f"(3-epoch mean {v['inner_ndcg@10_smoothed']:.4f})"
        )
    holds = config_holds(TrainConfig.from_yaml(config, [f"data.path={data}"]), selection["chosen"])
    say(f"chosen: {selection['chosen']['name']} x {selection['chosen']['epochs']} epochs")
    for key, h in holds.items():
        say(f"  {key}: chosen {h['chosen']}, {config} has {h['config']}{'' if h['same'] else '  <- differs'}")
    return {
        "what": (
            "cotrr-ray's choice for configs/mslr.yaml: bench/quality_bench.py's selection phase (select_cotrr) on "
            "every query of the data file; inner grouped K-fold CV scores only, no other query read"
        ),
        "command": "python bench/mslr_tuning.py " + " ".join(sys.argv[1:]),
        "data": str(data),
        "data_fingerprint": file_fingerprint(data),
        "queries": len(lists),
        "config": str(config),
        "overrides": [*settings.model_overrides, *overrides],
        "epoch_grid": [1, settings.max_epochs],
        "smooth": settings.smooth,
        **selection,
        "config_holds_choice": holds,
        "machine": {**basic_machine(), "load_avg_end": list(os.getloadavg()), "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mslr-web10k-sample" / "train.txt"))
    p.add_argument("--config", default=str(REPO / "configs" / "mslr.yaml"))
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: the bench's --quick settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="TrainConfig override key.path=value")
    args = p.parse_args(argv)
    res = run(args.data, args.config, qb.quick_settings() if args.quick else qb.Settings(), args.overrides)
    if args.json_out:
        write_json(res, Path(args.json_out), indent=1, newline=True)
    return res


if __name__ == "__main__":
    main()
