"""A real S3-compatible server on loopback (moto's standalone server), for tests, benches and cluster/local.sh.

    with LoopbackS3(port) as s3:          # starts `python -m moto.server -H 127.0.0.1 -p PORT`
        s3.create_bucket("models")        # then s3://models/... works for pyarrow.fs and boto3
        env = s3.env                      # AWS_ENDPOINT_URL + fake credentials, for child processes

    python bench/kit/s3.py --port 9000 --bucket models   # standalone (cluster/local.sh): runs until killed
    eval "$(python bench/kit/s3.py --port 9000 --print-env)"   # its client environment, as shell exports

Clients talk to it over HTTP exactly as to AWS (same SigV4 requests, same conditional-write
semantics for If-None-Match), so nothing in the package knows it is a test server: only the
environment differs. State lives in the server's memory and ends with it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENV = {
    "AWS_ACCESS_KEY_ID": "cotrr-test",
    "AWS_SECRET_ACCESS_KEY": "cotrr-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s IMDS probe per client on a machine outside EC2
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(port: int) -> dict[str, str]:
    """The AWS environment that points pyarrow and boto3 at the loopback server on `port`."""
    return {**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


class LoopbackS3:
    def __init__(self, port: int | None = None, log: str | Path | None = None):
        self.port = port or free_port()
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return env_for(self.port)

    def start(self, timeout_s: float = 30.0) -> LoopbackS3:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server on {self.endpoint} did not answer within {timeout_s:.0f} s")

    def create_bucket(self, bucket: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_client_kwargs()).create_bucket(Bucket=bucket)
        return f"s3://{bucket}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _client_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": ENV["AWS_REGION"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description="Run a loopback S3 server until killed")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    p.add_argument("--log", default=None)
    p.add_argument("--print-env", action="store_true", help="print the client environment as `export` lines and exit")
    args = p.parse_args()
    if args.print_env:
        for k, v in env_for(args.port).items():
            print(f"export {k}={shlex.quote(v)}")
        return
    s3 = LoopbackS3(args.port, args.log).start()
    for b in args.bucket:
        s3.create_bucket(b)
    print(f"loopback S3 on {s3.endpoint} (pid {s3.proc.pid}); buckets {args.bucket}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (s3.stop(), os._exit(0)))
    try:
        s3.proc.wait()
    except KeyboardInterrupt:
        s3.stop()


if __name__ == "__main__":
    main()
