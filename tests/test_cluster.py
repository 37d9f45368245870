"""cluster/: launcher YAML, KubeRay manifests, Dockerfile and local.sh, checked without a cluster.

- cluster/cluster.yaml passes Ray's own `prepare_config` + `validate_config` (the checks `ray up`
  runs before touching a cloud account);
- cluster/kuberay/rayservice.yaml is exactly what cluster/gen_rayservice.py generates from
  serve_config.yaml, its serveConfigV2 is a valid ServeDeploySchema and differs from
  serve_config.yaml only at the declared Kubernetes overrides (so the two cannot drift);
- cluster/kuberay/rayjob.yaml's entrypoint overrides validate as a TrainConfig and write the
  bundle the RayService serves;
- images, Ray versions, GPU limits, head `num-cpus: "0"` and the shared volume agree across files;
- cluster/local.sh parses (`bash -n`); its serve-config rewrite validates.
What only a real cloud / Kubernetes cluster can check is listed in cluster/README.md.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cotrr_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))
import gen_rayservice  # noqa: E402
import localctl  # noqa: E402

IMAGE = "ghcr.io/example-org/cotrr-ray:0.1.0-gpu"  # the -gpu build of cluster/Dockerfile
IMAGE_REPO_DIR = "/home/ray/cotrr-ray"  # WORKDIR of cluster/Dockerfile
SHARED = gen_rayservice.SHARED_MOUNT


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _named(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    names = [i["name"] for i in items]
    assert len(set(names)) == len(names), names
    return {i["name"]: i for i in items}


def diff_paths(a: Any, b: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths where two parsed configs differ; lists of named items are matched by name."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple[str, ...]] = set()
        for k in a.keys() | b.keys():
            if k not in a or k not in b:
                out.add((*path, str(k)))
            else:
                out |= diff_paths(a[k], b[k], (*path, str(k)))
        return out
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(i, dict) and "name" in i for i in a + b):
        return diff_paths(_named(a), _named(b), path)
    return set() if a == b and type(a) is type(b) else {path}


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


# ----------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_passes_ray_validation() -> None:
    raw = _load(CLUSTER / "cluster.yaml")
    cfg = prepare_config(raw)  # merges provider defaults, node-type min/max, docker checks
    validate_config(cfg)  # ray-schema.json + Ray's extra checks
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no work may land on the head"
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1, workers
    assert gpu[0]["max_workers"] > gpu[0]["min_workers"] >= 0  # autoscaling group
    assert cfg["max_workers"] >= gpu[0]["max_workers"]
    assert cfg["docker"]["image"] == IMAGE
    # The image has the package: after merging Ray's AWS defaults nothing is installed at setup
    # (the defaults would pip-install a nightly Ray and boto3).
    assert cfg["setup_commands"] == cfg["head_setup_commands"] == cfg["worker_setup_commands"] == []
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2


def test_cluster_launcher_validation_is_not_vacuous() -> None:
    raw = _load(CLUSTER / "cluster.yaml")
    raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"  # not an integer
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
    raw = _load(CLUSTER / "cluster.yaml")
    raw["docker"]["imagee"] = IMAGE  # unknown key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


# -------------------------------------------------------------------------------- RayService


def _serve_config_v2() -> dict[str, Any]:
    text = _load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def test_rayservice_is_generated_from_serve_config() -> None:
    committed = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    serve_text = (ROOT / "serve_config.yaml").read_text()
    assert gen_rayservice.render(committed, serve_text) == committed, (
        "cluster/kuberay/rayservice.yaml is stale: run python cluster/gen_rayservice.py"
    )
    assert gen_rayservice.main(["--check"]) == 0


def test_rayservice_differs_from_serve_config_only_by_the_k8s_overrides() -> None:
    serve_cfg = _load(ROOT / "serve_config.yaml")
    v2 = _serve_config_v2()
    ServeDeploySchema.model_validate(v2)
    # Independent of the generator's own code path: compare the parsed documents.
    assert diff_paths(serve_cfg, v2) == set(gen_rayservice.K8S_OVERRIDES)
    assert v2 == gen_rayservice.k8s_serve_config(serve_cfg)
    app = _named(v2["applications"])["rerank"]
    assert app["import_path"] == "cotrr_ray.serving.app:build_app"
    assert app["args"]["bundle_uri"] == gen_rayservice.K8S_BUNDLE_URI
    assert app["args"]["bundle_uri"].startswith(SHARED + "/")
    assert _named(app["deployments"])["Scorer"]["ray_actor_options"]["num_gpus"] == 1
    assert v2["http_options"]["host"] == "0.0.0.0"  # reachable through <name>-serve-svc


def test_generator_follows_serve_config_edits() -> None:
    committed = (CLUSTER / "kuberay" / "rayservice.yaml").read_text()
    serve_cfg = _load(ROOT / "serve_config.yaml")
    _named(_named(serve_cfg["applications"])["rerank"]["deployments"])["Router"]["user_config"][
        "rollout_percentage"
    ] = 7
    out = gen_rayservice.render(committed, yaml.safe_dump(serve_cfg, sort_keys=False))
    assert out != committed
    v2 = yaml.safe_load(yaml.safe_load(out)["spec"]["serveConfigV2"])
    assert (
        _named(_named(v2["applications"])["rerank"]["deployments"])["Router"]["user_config"]["rollout_percentage"] == 7
    )
    # Everything outside the block is untouched.
    strip = lambda d: {k: v for k, v in d["spec"].items() if k != "serveConfigV2"}  # noqa: E731
    assert strip(yaml.safe_load(out)) == strip(yaml.safe_load(committed))
    assert gen_rayservice.render(out, yaml.safe_dump(serve_cfg, sort_keys=False)) == out  # idempotent


def _check_ray_cluster(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{kind}: no work on the head"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for c in _containers(gpu["template"]):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in _groups(spec):
        for c in _containers(group["template"]):
            assert c["image"] == IMAGE, (kind, c["name"])
            assert isinstance(c["resources"]["limits"]["cpu"], str)
        mounts = {m["mountPath"]: m["name"] for c in _containers(group["template"]) for m in c.get("volumeMounts", [])}
        assert SHARED in mounts, f"{kind}: every pod needs the shared volume"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        pvc = _load(CLUSTER / "kuberay" / "pvc.yaml")
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return gpu


def test_rayservice_cluster_spec() -> None:
    doc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    gpu = _check_ray_cluster(doc["spec"]["rayClusterConfig"], "RayService")
    scorer = _named(_named(_serve_config_v2()["applications"])["rerank"]["deployments"])["Scorer"]
    # one GPU per Scorer replica, one GPU per pod: the group can hold min..max Scorer replicas
    assert gpu["minReplicas"] >= scorer["autoscaling_config"]["min_replicas"]
    assert gpu["maxReplicas"] >= scorer["autoscaling_config"]["max_replicas"]


# ------------------------------------------------------------------------------------ RayJob


def test_rayjob_spec() -> None:
    doc = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 0  # retries are Ray Train's (FailureConfig), not new clusters
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    gpu = _check_ray_cluster(spec["rayClusterSpec"], "RayJob")

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{IMAGE_REPO_DIR}/train_job.py"
    assert (ROOT / Path(argv[1]).relative_to(IMAGE_REPO_DIR)).is_file()
    config = Path(argv[argv.index("--config") + 1])
    assert config == Path(IMAGE_REPO_DIR) / "configs" / "demo.yaml"
    output = argv[argv.index("--output") + 1]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    assert len(overrides) == len(argv) - 6, argv  # python, script, --config X, --output Y
    cfg = TrainConfig.from_yaml(ROOT / config.relative_to(IMAGE_REPO_DIR), [*overrides, f"output={output}"])
    served = f"{cfg.output}@{cfg.alias}"
    assert served == gen_rayservice.K8S_BUNDLE_URI, "the RayJob must publish the alias the RayService serves"
    assert cfg.scaling.use_gpu is True
    assert cfg.scaling.max_failures > 0
    assert cfg.scaling.storage_path is not None and cfg.scaling.storage_path.startswith(SHARED + "/")
    assert cfg.data.cache_dir.startswith("/")
    assert gpu["maxReplicas"] >= cfg.scaling.num_workers  # one GPU worker pod per Train worker


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms[-1] == "FROM rayproject/ray:" + ray.__version__ + "-py311${RAY_VARIANT}"
    assert 'ARG RAY_VARIANT=""' in lines
    assert f"ARG RAY_VERSION={ray.__version__}" in lines
    assert IMAGE.endswith("-gpu")  # manifests name the RAY_VARIANT=-gpu build
    installs = [line for line in lines if "pip install" in line]
    assert any(re.search(r"pip install .*--index-url .*torch==", line) for line in installs)
    assert any(re.search(r"pip install --no-cache-dir \. ", line) for line in installs)
    assert not any(dev in line for line in installs for dev in ("[dev]", "pytest", "httpx", "hypothesis"))
    # Every COPY source passes cluster/Dockerfile.dockerignore (an allow-list).
    allowed = {
        line[1:].rstrip("/")
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [t for t in line.split()[1:-1] if not t.startswith("--")]
            assert set(sources) <= allowed, (line, allowed)
            assert all((ROOT / s).exists() for s in sources), line
    assert re.search(r"^WORKDIR " + re.escape(IMAGE_REPO_DIR) + "$", text, re.M)


# ---------------------------------------------------------------------------------- local.sh


def test_local_sh_parses_and_is_executable() -> None:
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111, "chmod +x cluster/local.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray stop" not in re.sub(r"#.*", "", text), "local.sh must not run `ray stop` (kills other clusters)"
    assert "trap teardown EXIT" in text
    for needle in (
        "ray job submit",
        "--working-dir .",
        "serve deploy",
        "RAY_AUTH_MODE=token",
        "--temp-dir",
        'REGISTRY="s3://',
        "--alias production",
        "COTRR_BUNDLE_CACHE=",
        "--print-env",
    ):
        assert needle in text, needle


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_local_sh_shellcheck() -> None:
    subprocess.run(["shellcheck", "-S", "error", str(CLUSTER / "local.sh")], check=True)


@pytest.mark.parametrize("kind", ["s3 alias", "local dir"])
def test_local_serve_config_is_serve_config_plus_local_changes(tmp_path: Path, kind: str) -> None:
    bundle = "s3://cotrr/registry/demo@production" if kind == "s3 alias" else str(tmp_path / "bundle")
    cfg = localctl.local_serve_config(ROOT / "serve_config.yaml", bundle, 18123)
    ServeDeploySchema.model_validate(cfg)
    expected = {
        ("http_options", "host"),
        ("http_options", "port"),
        ("applications", "rerank", "args", "bundle_uri"),
        *(
            ("applications", "rerank", "deployments", name, "ray_actor_options", "label_selector")
            for name in localctl.LOCAL_PLACEMENT
        ),
    }
    assert diff_paths(_load(ROOT / "serve_config.yaml"), cfg) == expected
    app = _named(cfg["applications"])["rerank"]
    assert app["args"]["bundle_uri"] == (bundle if kind == "s3 alias" else str(Path(bundle).resolve()))
    assert cfg["http_options"] == {**cfg["http_options"], "host": "127.0.0.1", "port": 18123}


def test_local_free_ports_are_distinct_and_free() -> None:
    ports = localctl.free_ports(7)
    assert len(set(ports)) == 7
    assert all(localctl.port_is_free(p) for p in ports)


def test_local_last_bundle_reads_the_jobs_last_bundle_line(tmp_path: Path) -> None:
    log = tmp_path / "train-job.log"
    log.write_text(
        "(RayTrainWorker pid=1) epoch 1\nbundle old s3://b/r/demo/old\n"
        "bundle 20261203-abc s3://b/r/demo/20261203-abc (production -> it)\n"
        "------\nJob 'x' succeeded\n"
    )
    assert localctl.last_bundle(log) == "20261203-abc"
    log.write_text("Job 'x' failed\n")
    with pytest.raises(SystemExit, match="no `bundle"):
        localctl.last_bundle(log)


def test_local_storage_check_needs_alias_checkpoints_and_every_node_cache(s3_bucket, bundle_a, tmp_path) -> None:
    """The check local.sh ends with fails for each thing that could be missing, on the loopback S3."""
    import json
    import uuid

    from cotrr_ray import storage
    from cotrr_ray.bundles.registry import Registry

    registry = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/registry"
    reg = Registry(registry)
    reg.publish(bundle_a, "demo")
    bundle_id = json.loads((bundle_a / "manifest.json").read_text())["bundle_id"]
    head, worker = tmp_path / "cache-head", tmp_path / "cache-worker"
    check = lambda: localctl.check_storage(registry, "demo", bundle_id, [head, worker])  # noqa: E731
    with pytest.raises(Exception, match="production"):
        check()  # no alias yet
    reg.set_alias("demo", "production", bundle_id)
    with pytest.raises(SystemExit, match="no Ray Train checkpoint"):
        check()
    storage.write_bytes(storage.locate(f"{registry}/_runs/run/checkpoint_000000/state.pt"), b"x")
    reg.fetch("demo", bundle_id, head)
    with pytest.raises(SystemExit, match="cache-worker"):
        check()  # the worker node never fetched it
    reg.fetch("demo", bundle_id, worker)
    check()
