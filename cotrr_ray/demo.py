"""The whole system on one machine: train, serve, send real HTTP requests, shut down.

    python -m cotrr_ray.demo

1. starts a local Ray instance (its own; it never attaches to a running cluster);
2. trains the demo bundle with Ray Train (`cotrr_ray/configs/demo.yaml`: synthetic image-search data,
   2 CPU workers) and prints the held-out test metrics;
3. serves it with `serve run serve_config.yaml` on that Ray instance (port 8000);
4. sends rerank requests for queries the model never saw, over HTTP, JSON and base64 bodies, plus
   one malformed request, and prints the reranked lists next to the true labels;
5. stops Serve and Ray.

The configs it needs ship inside the package (`cotrr_ray/configs/`, package data), so the demo runs
from a wheel install too. In a checkout it works in the repo root (as before: `artifacts/` there);
installed, in the current directory. `configs/demo.yaml` in the repo is a link to the packaged
file; the packaged `serve_config.yaml` is a copy of the repo's, kept identical by tests/test_configs.py.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from cotrr_ray.config import TrainConfig
from cotrr_ray.data.synthetic import generate_query
from cotrr_ray.serving.client import request_from_record

REPO = Path(__file__).resolve().parent.parent  # the checkout root, or site-packages when installed


def packaged_config(name: str) -> Path:
    """A config shipped in the package (`cotrr_ray/configs/<name>`): found from any cwd, checkout or wheel."""
    path = Path(str(importlib.resources.files("cotrr_ray") / "configs" / name))
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not shipped in {path.parent} (cotrr_ray package data)")
    return path


def work_dir() -> Path:
    """Where the demo runs: the repo root of a checkout (configs name repo-relative paths, e.g. the bundle
    location serve_config.yaml reads), else the current directory."""
    return REPO if (REPO / "pyproject.toml").is_file() and (REPO / "serve_config.yaml").is_file() else Path.cwd()


def default_serve_config() -> Path:
    """The repo's serve_config.yaml in a checkout, else the packaged copy."""
    return REPO / "serve_config.yaml" if work_dir() == REPO else packaged_config("serve_config.yaml")


def _wait_healthy(client: httpx.Client, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited with code {proc.returncode}; see its log")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the application did not become healthy within {timeout_s:.0f} s")


def _request_body(k: int, encoding: str) -> tuple[dict, dict[str, float]]:
    # Seeds far from the training data's (seed 0): these queries were never seen in training.
    rng = np.random.default_rng(10_000 + k)
    rec = generate_query(rng, f"demo-q{k}", n=40, top_m=20, encoding=encoding)
    return request_from_record(rec, unit_id=f"user-{k}", top_n=8)


def _show(resp: httpx.Response, labels: dict[str, float], latency_ms: float) -> None:
    r = resp.json()
    print(
        f"  arm={r['arm']} model={r['model_version']} fallback={r['fallback']} "
        f"calibrated={r['calibrated']} latency={latency_ms:.1f} ms"
    )
    print(f"  {'rank':>4} {'id':<14} {'upstream#':>9} {'score':>7} {'P(rel)':>7} {'label':>5}")
    for item in r["results"]:
        score = "-" if item["score"] is None else f"{item['score']:.3f}"
        prob = "-" if item["probability"] is None else f"{item['probability']:.2f}"
        print(
            f"  {item['rank']:>4} {item['id']:<14} {item['index']:>9} {score:>7} {prob:>7} {labels[item['id']]:>5.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train, serve and query cotrr-ray end to end on a local Ray.")
    p.add_argument("--config", default=None, help="TrainConfig YAML (default: the packaged demo.yaml)")
    p.add_argument("--serve-config", default=None, help="Serve config (default: serve_config.yaml)")
    p.add_argument("--requests", type=int, default=3)
    args = p.parse_args(argv)

    import ray

    from cotrr_ray.training.job import run

    # Relative --config / --serve-config paths are read from the work dir, as before.
    config = args.config or packaged_config("demo.yaml")
    serve_config = str(args.serve_config or default_serve_config())
    workdir = work_dir()
    os.chdir(workdir)  # configs name relative paths (the bundle location serve_config.yaml reads)
    print("== 1. local Ray")
    ctx = ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve_proc = None
    log_path = workdir / "artifacts/demo-serve.log"
    try:
        print("== 2. training with Ray Train")
        bundle = run(TrainConfig.from_yaml(config))
        print(f"bundle: {bundle}")

        print(f"== 3. serve run {Path(serve_config).name} (log: {log_path})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
        with open(log_path, "wb") as log:
            serve_proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ray.serve.scripts",
                    "run",
                    serve_config,
                    "--address",
                    ctx.address_info["gcs_address"],
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        with httpx.Client(base_url="http://127.0.0.1:8000", timeout=30) as client:
            t0 = time.monotonic()
            _wait_healthy(client, serve_proc, timeout_s=180)
            print(f"healthy after {time.monotonic() - t0:.0f} s: {client.get('/v1/model').json()['model_version']}")

            print("== 4. HTTP requests (unseen queries; 'label' is the hidden truth, not sent)")
            for k in range(args.requests):
                encoding = "base64" if k % 2 else "list"
                body, labels = _request_body(k, encoding)
                t = time.perf_counter()
                resp = client.post("/v1/rerank", json=body)
                latency = 1000 * (time.perf_counter() - t)
                resp.raise_for_status()
                print(
                    f"POST /v1/rerank  query={body['query']['id']} unit={body['unit_id']} "
                    f"({len(body['candidates'])} candidates, {encoding} embeddings)"
                )
                _show(resp, labels, latency)
            bad, _ = _request_body(99, "list")
            bad["candidates"][3]["features"]["visual"] = [0.0] * 7
            resp = client.post("/v1/rerank", json=bad)
            print(f"malformed request -> {resp.status_code} {resp.json()}")
            stats = client.get("/v1/stats").json()
            print(f"/v1/stats: { {k: stats[k] for k in list(stats)[:6]} }")
    finally:
        print("== 5. shutting down")
        if serve_proc is not None and serve_proc.poll() is None:
            serve_proc.send_signal(signal.SIGTERM)  # `serve run` deletes its app on SIGTERM
            try:
                serve_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve_proc.kill()
        ray.shutdown()
    print("done")


if __name__ == "__main__":
    main()
