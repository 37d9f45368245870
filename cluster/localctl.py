"""Python helpers of `cluster/local.sh` (one process each, so Ray is imported once per step).

    python cluster/localctl.py ports N
    python cluster/localctl.py port-free PORT
    python cluster/localctl.py serve-config --src serve_config.yaml --dst OUT.yaml --bundle URI --port P
    python cluster/localctl.py wait-nodes --address 127.0.0.1:GCS --count 2
    python cluster/localctl.py wait-serve --dashboard http://127.0.0.1:DASH --app rerank
    python cluster/localctl.py placement --address 127.0.0.1:GCS
    python cluster/localctl.py requests --port P --expect-id BUNDLE_ID
    python cluster/localctl.py last-bundle --log train-job.log
    python cluster/localctl.py storage --registry s3://B/registry --model demo --bundle-id ID --cache DIR ...
    python cluster/localctl.py shards --address 127.0.0.1:GCS --dataset s3://B/datasets/D --storage s3://B/x

Token auth: the Ray clients used here (state API, Serve REST client) add the bearer token
themselves when RAY_AUTH_MODE=token (token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), exactly like the `ray`/`serve` CLIs; local.sh exports those variables.
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

# The node labels local.sh gives its two nodes (`ray start --labels cotrr-role=...`).
ROLE_LABEL = "cotrr-role"
# Where the Serve deployments must run in the local two-node cluster, so that serving really spans
# both nodes: the Router (HTTP ingress) and the Calibrator on the head, the Scorer (the model) on
# the worker. Scorer and Calibrator both read the bundle, so each node fetches it from the object
# store into its own cache: what a replica on a fresh node of a real cluster does.
LOCAL_PLACEMENT = {"Router": "head", "Calibrator": "head", "Scorer": "worker"}


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (held open until all are picked)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    # A plain bind (no SO_REUSEPORT) fails while anyone listens on the port, including another
    # engineer's Serve proxy on 0.0.0.0:8000 (Serve binds with SO_REUSEPORT; a second Serve on the
    # same port would silently share the traffic, which is why local.sh checks first).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def local_serve_config(src: Path, bundle: str, port: int) -> dict[str, Any]:
    """serve_config.yaml with the three changes a one-machine two-node cluster needs.

    1. `bundle_uri` replaced: local.sh passes the registry alias on its object store
       (`s3://<bucket>/registry/demo@production`); a local path is made absolute, because
       `serve deploy` builds the app in a cluster process whose working directory is not the repo;
    2. HTTP on 127.0.0.1:<port> instead of 0.0.0.0:8000 (loopback only; another Serve may own 8000);
    3. `label_selector`s pinning the Router and Calibrator to the head node, the Scorer to the worker.
    Everything else (deployments, autoscaling, user_configs) is served as written.
    """
    cfg = yaml.safe_load(src.read_text())
    cfg.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    (app,) = [a for a in cfg["applications"] if a["name"] == "rerank"]
    app["args"]["bundle_uri"] = bundle if "://" in bundle else str(Path(bundle).resolve())
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, role in LOCAL_PLACEMENT.items():
        opts = deployments[name].setdefault("ray_actor_options", {})
        opts["label_selector"] = {ROLE_LABEL: role}
    return cfg


def _role(node: Any) -> str:
    return (node.labels or {}).get(ROLE_LABEL, "?")


def wait_nodes(address: str, count: int, timeout_s: float) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout_s
    alive: list[Any] = []
    while time.monotonic() < deadline:
        try:
            alive = [n for n in list_nodes(address=address, detail=True) if n.state == "ALIVE"]
        except Exception as e:  # the dashboard's state API comes up a little after the GCS
            print(f"  (state API not ready: {type(e).__name__})", flush=True)
            alive = []
        if len(alive) >= count:
            for n in sorted(alive, key=_role):
                res = {k: v for k, v in (n.resources_total or {}).items() if not k.startswith("node:")}
                print(f"  node {n.node_id[:12]} role={_role(n)} ip={n.node_ip} head={n.is_head_node} resources={res}")
            return
        time.sleep(2)
    raise SystemExit(f"only {len(alive)} of {count} Ray nodes alive after {timeout_s:.0f} s")


def wait_serve(dashboard: str, app: str, timeout_s: float) -> None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            details = client.get_serve_details()
        except Exception as e:
            details = {}
            print(f"  (serve REST API: {type(e).__name__}: {e})", flush=True)
        a = (details.get("applications") or {}).get(app)
        if a is not None:
            deps = {name: d.get("status") for name, d in (a.get("deployments") or {}).items()}
            state = (a["status"], tuple(sorted(deps.items())))
            if state != last:
                print(f"  app {app}: {a['status']} {deps}", flush=True)
                last = state
            if a["status"] == "RUNNING":
                return
            if a["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise SystemExit(f"app {app} is {a['status']}: {a.get('message', '')}")
        time.sleep(3)
    raise SystemExit(f"app {app} not RUNNING after {timeout_s:.0f} s (last: {last})")


def placement(address: str) -> None:
    """Which actors ran on which node (alive and dead: the training workers are gone by now)."""
    from ray.util.state import list_actors, list_nodes

    roles = {n.node_id: _role(n) for n in list_nodes(address=address, detail=True)}
    per_role: dict[str, Counter[str]] = {}
    for a in list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        if a.node_id is None:
            continue
        name = a.class_name or "?"
        if name.startswith("ServeReplica:"):
            name = "Serve " + name.split(":")[-1]
        per_role.setdefault(roles.get(a.node_id, "?"), Counter())[f"{name} ({a.state.lower()})"] += 1
    for role in sorted(per_role):
        items = ", ".join(f"{k} x{v}" for k, v in sorted(per_role[role].items()))
        print(f"  {role:>6} node: {items}")
    ran = {role for role, c in per_role.items() if any("RayTrainWorker" in k for k in c)}
    served = {role for role, c in per_role.items() if any(k.startswith("Serve ") for k in c)}
    print(f"  -> training workers ran on: {sorted(ran)}; Serve replicas run on: {sorted(served)}")
    if not ({"head", "worker"} <= ran or {"head", "worker"} <= served):
        raise SystemExit("work did not land on both nodes")


def _record_shard(config: dict[str, Any]) -> None:
    """A Train worker of `check_shards`: the node it runs on and the query ids of its training shard
    (one epoch, through the job's own `ShardBatches`), written to the object store."""
    import ray
    import ray.train

    from cotrr_ray.config import TrainConfig
    from cotrr_ray.storage import locate, write_bytes
    from cotrr_ray.training.ingest import worker_batches

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    train, _ = worker_batches(cfg, config["data"], rank, ctx.get_world_size())
    ids = [q for t in train.epoch_tables(0) for q in t.column("query_id").to_pylist()]
    node = ray.get_runtime_context().get_node_id()
    out = locate(config["out"]).child(f"rank{rank}.json")
    write_bytes(out, json.dumps({"node": node, "ids": ids}).encode())
    ray.train.report({"queries": len(ids)})


def check_shards(address: str, dataset: str, storage: str) -> None:
    """Two Train workers on two nodes (STRICT_SPREAD) read disjoint shards of `dataset` through the
    job's Ray Data path, checked by the query ids each one saw."""
    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cotrr_ray.config import TrainConfig
    from cotrr_ray.storage import locate, read_bytes
    from cotrr_ray.training.ingest import ingest_config, open_training_data, parquet_source

    ray.init(address=address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # as the job reads (deterministic shards)
    ctx.enable_progress_bars = False
    cfg = TrainConfig.from_yaml(None, ["data.format=parquet", f"data.path={dataset}", "data.cache_max_mb=0"])
    data = open_training_data(cfg, parquet_source(cfg, dataset, say=lambda _: None))
    out = locate(storage).child("shards-check")
    trainer = TorchTrainer(
        _record_shard,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": data.loop_config(), "out": out.uri},
        datasets=data.datasets(),
        dataset_config=ingest_config(),
        scaling_config=ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": 0.5}, placement_strategy="STRICT_SPREAD"
        ),
        run_config=RunConfig(name=f"shards-check-{int(time.time())}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error:
        raise SystemExit(f"shards check failed: {result.error}")
    ranks = [json.loads(read_bytes(out.child(f"rank{r}.json"))) for r in (0, 1)]
    a, b = (set(r["ids"]) for r in ranks)
    print(
        f"  rank 0 on node {ranks[0]['node'][:12]}: {len(a)} queries; rank 1 on node {ranks[1]['node'][:12]}: {len(b)} queries"
    )
    print(f"  training split {data.counts['train']} queries; overlap {len(a & b)}; union {len(a | b)}")
    if ranks[0]["node"] == ranks[1]["node"]:
        raise SystemExit("both workers ran on one node")
    if a & b or len(a | b) < data.counts["train"] - 1:
        raise SystemExit("the shards overlap or do not cover the training split")


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, Any, float]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    ms = 1000 * (time.perf_counter() - t)
    try:
        return status, json.loads(raw), ms
    except ValueError:
        return status, raw.decode(errors="replace"), ms


def last_bundle(log: Path) -> str:
    """The bundle id from train_job.py's last line, `bundle <id> <uri> [(<alias> -> it)]`."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip().startswith("bundle ")]
    if not lines:
        raise SystemExit(f"no `bundle <id> <uri>` line in {log}: did training publish?")
    return lines[-1].split()[1]


def check_storage(registry: str, model: str, bundle_id: str, caches: list[Path]) -> None:
    """Everything lives in the object store, and every node fetched the bundle from it.

    - the registry's `production` alias names this run's bundle, and the bundle is published there;
    - Ray Train's checkpoints are under `<registry>/_runs` (the job's default storage_path);
    - each node's bundle cache (COTRR_BUNDLE_CACHE of that node's `ray start`) holds a verified copy.
    """
    from pyarrow import fs as pafs

    from cotrr_ray import storage
    from cotrr_ray.bundles.registry import Registry, matches_manifest

    reg = Registry(registry)
    target = reg.resolve(model, "production")
    print(f"  {registry}/{model}@production -> {target}")
    if target != bundle_id:
        raise SystemExit(f"production names {target}, not this run's bundle {bundle_id}")
    manifest = reg.manifest(model, bundle_id)
    print(f"  {registry}/{model}/{bundle_id}: {len(manifest['files'])} files + manifest.json")
    runs = storage.locate(f"{registry}/_runs")
    infos = runs.filesystem.get_file_info(pafs.FileSelector(runs.path, recursive=True, allow_not_found=True))
    checkpoints = sorted({i.path.rsplit("/", 1)[0] for i in infos if "/checkpoint_" in i.path and i.is_file})
    print(f"  {runs.uri}: {sum(i.is_file for i in infos)} objects, {len(checkpoints)} checkpoint directories")
    if not checkpoints:
        raise SystemExit(f"no Ray Train checkpoint under {runs.uri}")
    for cache in caches:
        entry = cache / bundle_id
        ok = entry.is_dir() and matches_manifest(entry, manifest)
        print(f"  node cache {entry}: {'verified copy' if ok else 'MISSING'}")
        if not ok:
            raise SystemExit(f"{entry} holds no verified copy of {bundle_id}: that node did not fetch the bundle")


def send_requests(port: int, expected: str, n: int) -> None:
    import numpy as np

    from cotrr_ray.data.synthetic import generate_query
    from cotrr_ray.serving.client import request_from_record

    base = f"http://127.0.0.1:{port}"
    status, health, ms = _http("GET", f"{base}/healthz")
    print(f"GET /healthz -> {status} ({ms:.0f} ms)")
    status, model, _ = _http("GET", f"{base}/v1/model")
    version = model.get("model_version") if isinstance(model, dict) else None
    print(f"GET /v1/model -> {status}: model_version={version}")
    if version != expected:
        raise SystemExit(f"the server on {base} serves {version!r}, not this run's bundle {expected!r}")
    failures = 0
    for k in range(n):
        encoding = "base64" if k % 2 else "list"
        rec = generate_query(np.random.default_rng(20_000 + k), f"local-q{k}", n=30, top_m=20, encoding=encoding)
        body, labels = request_from_record(rec, unit_id=f"user-{k}", top_n=5)  # labels: hidden truth, not sent
        status, r, ms = _http("POST", f"{base}/v1/rerank", body)
        print(
            f"POST /v1/rerank query={rec['id']} ({len(body['candidates'])} candidates, {encoding}) -> {status} in {ms:.0f} ms"
        )
        if status != 200:
            failures += 1
            print(f"  {r}")
            continue
        print(f"  arm={r['arm']} model={r['model_version']} fallback={r['fallback']} calibrated={r['calibrated']}")
        for item in r["results"]:
            score = "-" if item["score"] is None else f"{item['score']:.3f}"
            prob = "-" if item["probability"] is None else f"{item['probability']:.2f}"
            print(
                f"  #{item['rank']} {item['id']:<14} upstream#{item['index']:<3} score={score:>7} "
                f"P(rel)={prob:>5} label={labels[item['id']]:.0f}"
            )
    if failures:
        raise SystemExit(f"{failures} of {n} rerank requests failed")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ports")
    s.add_argument("n", type=int)
    s = sub.add_parser("port-free")
    s.add_argument("port", type=int)
    s = sub.add_parser("serve-config")
    s.add_argument("--src", type=Path, required=True)
    s.add_argument("--dst", type=Path, required=True)
    s.add_argument("--bundle", required=True, help="bundle URI for args.bundle_uri")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("wait-nodes")
    s.add_argument("--address", required=True)
    s.add_argument("--count", type=int, default=2)
    s.add_argument("--timeout", type=float, default=120)
    s = sub.add_parser("wait-serve")
    s.add_argument("--dashboard", required=True)
    s.add_argument("--app", default="rerank")
    s.add_argument("--timeout", type=float, default=300)
    s = sub.add_parser("placement")
    s.add_argument("--address", required=True)
    s = sub.add_parser("requests")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--expect-id", required=True, help="the bundle id /v1/model must report")
    s.add_argument("--n", type=int, default=3)
    s = sub.add_parser("last-bundle")
    s.add_argument("--log", type=Path, required=True)
    s = sub.add_parser("storage")
    s.add_argument("--registry", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--bundle-id", required=True)
    s.add_argument("--cache", type=Path, action="append", default=[])
    s = sub.add_parser("shards")
    s.add_argument("--address", required=True)
    s.add_argument("--dataset", required=True, help="a Parquet dataset URI (s3://)")
    s.add_argument("--storage", required=True, help="Ray Train storage (shared: s3://)")
    a = p.parse_args(argv)

    if a.cmd == "ports":
        print(" ".join(map(str, free_ports(a.n))))
    elif a.cmd == "port-free":
        sys.exit(0 if port_is_free(a.port) else 1)
    elif a.cmd == "serve-config":
        cfg = local_serve_config(a.src, a.bundle, a.port)
        a.dst.write_text(f"# generated by cluster/localctl.py from {a.src}\n" + yaml.safe_dump(cfg, sort_keys=False))
    elif a.cmd == "wait-nodes":
        wait_nodes(a.address, a.count, a.timeout)
    elif a.cmd == "wait-serve":
        wait_serve(a.dashboard, a.app, a.timeout)
    elif a.cmd == "placement":
        placement(a.address)
    elif a.cmd == "requests":
        send_requests(a.port, a.expect_id, a.n)
    elif a.cmd == "last-bundle":
        print(last_bundle(a.log))
    elif a.cmd == "storage":
        check_storage(a.registry, a.model, a.bundle_id, a.cache)
    elif a.cmd == "shards":
        check_shards(a.address, a.dataset, a.storage)


if __name__ == "__main__":
    main()
