"""Generate the `serveConfigV2` of cluster/kuberay/rayservice.yaml from serve_config.yaml.

    python cluster/gen_rayservice.py           # rewrite the serveConfigV2 block in place
    python cluster/gen_rayservice.py --check   # exit 1 if the committed block is stale (CI)

serve_config.yaml stays the one place the application is defined. The RayService serves the same
file with exactly the Kubernetes changes listed in `K8S_OVERRIDES` (nothing else), and everything
outside the `serveConfigV2: |` block of rayservice.yaml (the RayCluster spec, comments) is kept as
written. tests/test_cluster.py asserts the committed manifest equals this script's output and
that it differs from serve_config.yaml only at the override paths.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"

# Shared storage of the Kubernetes deployment: a ReadWriteMany PVC (`cotrr-shared`, e.g. EFS,
# Filestore or an NFS CSI volume) mounted at this path in the head and every worker pod; the
# RayJob (cluster/kuberay/rayjob.yaml) publishes into the registry here and moves its `production`
# alias; the RayService serves that alias and its replicas follow it. The app builder (head pod) and
# the replicas (worker pods) read the registry, hence the volume on all pods. Without a PVC, put the
# registry on S3 instead (output: s3://bucket/registry/demo, bundle_uri: s3://bucket/registry/demo@production,
# AWS_* in the pods' env): replicas then download bundles into their local cache.
SHARED_MOUNT = "/mnt/shared"
K8S_MODEL_URI = f"{SHARED_MOUNT}/registry/demo"
K8S_BUNDLE_URI = f"{K8S_MODEL_URI}@production"

# Path -> value. A path walks dict keys; inside a list of named items (applications,
# deployments) a step is the item's `name`.
K8S_OVERRIDES: dict[tuple[str, ...], Any] = {
    # absolute path on the shared volume (a relative path would resolve against the head's cwd)
    ("applications", "rerank", "args", "bundle_uri"): K8S_BUNDLE_URI,
    # the GPU worker group: one GPU per Scorer replica (cuda + bf16 autocast); with
    # max_replicas 4 the autoscaler adds up to 4 GPU pods (workerGroupSpecs[gpu].maxReplicas)
    ("applications", "rerank", "deployments", "Scorer", "ray_actor_options", "num_gpus"): 1,
}

HEADER = (
    "# GENERATED from serve_config.yaml by cluster/gen_rayservice.py: do not edit here. Edit\n"
    "# serve_config.yaml (it has the comments), then run `python cluster/gen_rayservice.py`.\n"
    "# Kubernetes-only changes (K8S_OVERRIDES):\n"
    + "".join(f"#   {'.'.join(path)}: {value}\n" for path, value in K8S_OVERRIDES.items())
)

_BLOCK_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2: \|[-+]?\s*$")


def _step(node: Any, key: str, create: bool) -> Any:
    if isinstance(node, list):
        matches = [item for item in node if isinstance(item, dict) and item.get("name") == key]
        if len(matches) != 1:
            raise KeyError(f"no single list item named {key!r}")
        return matches[0]
    if key not in node:
        if not create:
            raise KeyError(key)
        node[key] = {}
    return node[key]


def set_path(cfg: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = cfg
    for key in path[:-1]:
        node = _step(node, key, create=True)
    node[path[-1]] = value


def k8s_serve_config(serve_cfg: dict[str, Any]) -> dict[str, Any]:
    """serve_config.yaml (parsed) with the Kubernetes overrides applied."""
    cfg = copy.deepcopy(serve_cfg)
    for path, value in K8S_OVERRIDES.items():
        set_path(cfg, path, value)
    return cfg


def render_serve_config_v2(serve_text: str) -> str:
    cfg = k8s_serve_config(yaml.safe_load(serve_text))
    return HEADER + yaml.safe_dump(cfg, sort_keys=False, width=100)


def render(rayservice_text: str, serve_text: str) -> str:
    """rayservice.yaml with its serveConfigV2 block replaced by the generated one."""
    lines = rayservice_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line)]
    if len(starts) != 1:
        raise ValueError("rayservice.yaml must contain exactly one `serveConfigV2: |` line")
    start = starts[0]
    indent = len(_BLOCK_KEY.match(lines[start]).group("indent"))  # type: ignore[union-attr]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    pad = " " * (indent + 2)
    block = [pad + line if line.strip() else "\n" for line in render_serve_config_v2(serve_text).splitlines(True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is not up to date")
    args = p.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if args.check:
        if current != wanted:
            print(f"{RAYSERVICE} is stale: run python cluster/gen_rayservice.py", file=sys.stderr)
            return 1
        print(f"{RAYSERVICE} is up to date")
        return 0
    if current != wanted:
        RAYSERVICE.write_text(wanted)
        print(f"wrote {RAYSERVICE}")
    else:
        print(f"{RAYSERVICE} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
