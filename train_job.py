"""Train a cotrr-ray bundle with Ray Train.

    python train_job.py --config configs/demo.yaml [--output REGISTRY/NAME] [--alias A] [key.path=value ...]

Locally this starts an embedded Ray (or attaches to a running `ray start` cluster); on a cluster:

    ray job submit --working-dir . -- python train_job.py --config configs/demo.yaml

The bundle is published into the registry model `output` names (`<registry>/<name>`, a local path or
s3://) under a new immutable id; `--alias candidate` then points that alias at it. The last line
printed is `bundle <bundle_id> <bundle URI>`. `configs/demo.yaml` is a symlink to the packaged
`cotrr_ray/configs/demo.yaml` (what `python -m cotrr_ray.demo` reads); either path works.
"""

from __future__ import annotations

import argparse
import logging

from cotrr_ray.config import TrainConfig
from cotrr_ray.training.job import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--config", required=True, help="YAML TrainConfig, e.g. configs/demo.yaml")
    p.add_argument("--output", default=None, help="registry model <registry>/<name> (overrides `output`)")
    p.add_argument("--alias", default=None, help="move this alias to the new bundle (overrides `alias`)")
    p.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=3e-4 data.path=FILE")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    if args.output:  # a path, not YAML: taken verbatim
        cfg = cfg.model_copy(update={"output": args.output})
    if args.alias:
        cfg = cfg.model_copy(update={"alias": args.alias})
    print(run(cfg), flush=True)


if __name__ == "__main__":
    main()
