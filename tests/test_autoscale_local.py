"""cluster/autoscale_local.py: the local autoscaling cluster is cluster/cluster.yaml, and its Serve config
is serve_config.yaml plus the declared overrides; the reduced end-to-end run behind an env switch.

    python -m pytest tests/test_autoscale_local.py                            # fast checks (no Ray)
    COTRR_AUTOSCALE_LOCAL=1 python -m pytest tests/test_autoscale_local.py    # + the reduced run (~2.5 min)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config
from ray.serve.schema import ServeDeploySchema
from test_cluster import diff_paths

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
import autoscale_local as al  # noqa: E402

RUN_E2E = os.environ.get("COTRR_AUTOSCALE_LOCAL") == "1"


def _deps(cfg: dict) -> dict[str, dict]:
    return {d["name"]: d for d in cfg["applications"][0]["deployments"]}


def test_fake_cluster_config_is_cluster_yaml_with_local_resources() -> None:
    launcher = al.load_launcher_config()
    o = al.LocalOverrides()
    cfg = al.fake_cluster_config(launcher, o, "127.0.0.1:40000")
    validate_config(cfg)  # the check the head's monitor runs on it (prepare_config needs a file the wheel lacks)
    assert cfg["provider"]["type"] == "fake_multinode"
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:40000"
    assert cfg["max_workers"] == launcher["max_workers"]
    assert cfg["upscaling_speed"] == launcher["upscaling_speed"]
    assert cfg["idle_timeout_minutes"] == o.idle_timeout_minutes  # the one cluster-level override
    head = launcher["head_node_type"]
    workers = {n: t for n, t in launcher["available_node_types"].items() if n != head}
    assert set(cfg["available_node_types"]) == {al.FAKE_HEAD_NODE_TYPE, *workers}
    assert cfg["available_node_types"][al.FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}  # no work on the head
    for name, t in workers.items():
        local = cfg["available_node_types"][name]
        assert (local["min_workers"], local["max_workers"]) == (t.get("min_workers", 0), t["max_workers"])
        assert local["labels"] == t["labels"]
        res = dict(local["resources"])
        assert res.pop("object_store_memory") == o.object_store_bytes
        assert "GPU" not in res, "a fake GPU would send the Scorer down the CUDA path"
        expected = {
            "CPU": o.worker_num_cpus,
            **({o.accelerator_resource: t["resources"]["GPU"]} if "GPU" in t["resources"] else {}),
        }
        assert res == expected


def test_cluster_yaml_scales_the_scorer_node_type_from_zero() -> None:
    launcher = al.load_launcher_config()
    wtype = al.worker_type(launcher)
    gpu = launcher["available_node_types"][wtype]
    assert gpu["min_workers"] == 0
    assert gpu["resources"]["GPU"] == 1
    shipped = _deps(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    # one Scorer replica per node (one GPU each): Serve's max_replicas and the node type's max_workers agree
    assert shipped["Scorer"]["autoscaling_config"]["max_replicas"] == gpu["max_workers"] <= launcher["max_workers"]


def test_local_serve_config_is_serve_config_plus_declared_overrides(tmp_path: Path) -> None:
    o = al.LocalOverrides()
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg = al.local_serve_config(http_port=18555, bundle=str(tmp_path / "b"), top_m=None, o=o)
    ServeDeploySchema.model_validate(cfg)
    autoscaled = [n for n, d in _deps(shipped).items() if "autoscaling_config" in d]
    assert set(autoscaled) == {"Router", "Scorer", "Calibrator"}
    app = ("applications", "rerank")
    assert diff_paths(shipped, cfg) == {
        ("http_options", "host"),
        ("http_options", "port"),
        ("proxy_location",),
        (*app, "args", "bundle_uri"),
        *((*app, "deployments", n, "autoscaling_config", "downscale_delay_s") for n in autoscaled),
        (*app, "deployments", "Scorer", "autoscaling_config", "target_ongoing_requests"),
        # the one-line difference to the GPU cluster's Scorer: num_gpus: 1 -> resources: {accelerator: 1}
        (*app, "deployments", "Scorer", "ray_actor_options", "num_gpus"),
        (*app, "deployments", "Scorer", "ray_actor_options", "resources"),
    }
    deps = _deps(cfg)
    assert cfg["proxy_location"] == "HeadOnly"
    assert deps["Scorer"]["ray_actor_options"] == {"num_cpus": 1, "resources": {o.accelerator_resource: 1}}
    assert all(d["autoscaling_config"]["downscale_delay_s"] == o.serve_downscale_delay_s for d in deps.values())


def test_min_replica_set_fits_one_worker_node_and_each_scorer_needs_its_own() -> None:
    """What makes the demo readable: the deploy brings up exactly one node, each further Scorer replica one more."""
    o = al.LocalOverrides()
    deps = _deps(al.local_serve_config(http_port=1, bundle="/b", top_m=None, o=o))
    min_cpus = sum(d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["min_replicas"] for d in deps.values())
    assert min_cpus <= o.worker_num_cpus
    launcher = al.load_launcher_config()
    node = al.fake_cluster_config(launcher, o, "x:1")["available_node_types"][al.worker_type(launcher)]["resources"]
    assert node[o.accelerator_resource] // deps["Scorer"]["ray_actor_options"]["resources"][o.accelerator_resource] == 1


def test_overrides_are_validated() -> None:
    with pytest.raises(ValueError):
        al.LocalOverrides(idle_timeout_minutes=0)
    with pytest.raises(ValueError):
        al.LocalOverrides(idle_timeout_s=30)  # unknown key: not silently ignored


@pytest.mark.integration
@pytest.mark.skipif(not RUN_E2E, reason="about 2.5 minutes: COTRR_AUTOSCALE_LOCAL=1 (or cluster/autoscale_local.py)")
def test_reduced_autoscale_run(bundle_a, tmp_path: Path) -> None:
    """The script's --quick ramp in its own process (it starts and tears down its own cluster): every
    check must pass, i.e. 0 failed requests, the Scorer scaled up, the autoscaler added nodes the new
    replicas served from, and removed them after the idle timeout."""
    out = tmp_path / "autoscale.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cluster" / "autoscale_local.py"),
            "--quick",
            "--bundle",
            str(bundle_a),
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:])
    assert result["total"]["failed"] == 0
    assert result["times_s"]["nodes_added_up"] and len(result["times_s"]["nodes_added_down"]) == len(
        result["times_s"]["nodes_added_up"]
    )
