"""Where bundles, aliases and checkpoints live: a local directory or an object store.

    loc = locate("s3://models/registry")          # or a local path, or file:///abs/path
    write_bytes(loc.child("a.json"), b"{}")       # atomic for readers: all of it or nothing
    create_exclusive(loc.child("b.json"), data)   # fails with AlreadyExists if it is there

Why `pyarrow.fs` (not fsspec): Ray Train already writes its checkpoints through it
(`RunConfig.storage_path`), it ships with Ray, and it speaks local paths, ``s3://`` and ``gs://``
natively; fsspec would add s3fs/aiobotocore (or gcsfs) for the same calls. The one primitive
`pyarrow.fs` lacks is a conditional write (create only if absent), which both the immutable
publish and the alias compare-and-swap need: locally it is ``os.link`` (atomic, fails when the
target exists); on S3 it is ``PutObject`` with ``If-None-Match: *`` through boto3 (AWS since
2024; MinIO, moto and most S3-compatible servers). ``gs://`` is read-only here: publishing and
alias moves refuse it with that reason rather than writing without the guarantee.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), which pyarrow and boto3 both read,
so a loopback server, MinIO or AWS are configured the same way for every process.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed or is not supported for this URI; the message names it."""


class AlreadyExists(StorageError):
    """`create_exclusive` found the object already there (someone else wrote it first)."""


@dataclass(frozen=True)
class Location:
    """One object or directory: a local absolute path, or ``scheme://bucket/key``."""

    scheme: str  # "file", "s3" or "gs"
    path: str  # local: absolute path; object stores: "bucket/key" (pyarrow's path form)

    @property
    def uri(self) -> str:
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        return Location(self.scheme, head or "/")

    def child(self, *parts: str) -> Location:
        return Location(self.scheme, "/".join([self.path.rstrip("/"), *parts]))

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The `pyarrow.fs` filesystem of this location (what Ray Train's `storage_filesystem` takes)."""
        return _filesystem(self.scheme)

    def __str__(self) -> str:
        return self.uri


def locate(uri: str | Path, base_dir: str | Path | None = None) -> Location:
    """A `Location` for a local path (relative to `base_dir`, default cwd), ``file://``, ``s3://`` or ``gs://``."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme not in ("s3", "gs"):
            raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file://, s3:// or gs://")
        rest = rest.strip("/")
        if not rest:
            raise StorageError(f"storage URI {uri!r} names no bucket")
        return Location(scheme, rest)
    p = Path(uri).expanduser()
    if not p.is_absolute():
        p = Path(base_dir or os.getcwd()) / p
    return Location("file", os.path.normpath(p))


@functools.cache
def _filesystem(scheme: str) -> pafs.FileSystem:
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme == "s3":
        # from_uri reads AWS_ENDPOINT_URL, credentials and region from the environment, like boto3.
        return pafs.FileSystem.from_uri("s3://")[0]
    if scheme == "gs":
        return pafs.GcsFileSystem()
    raise StorageError(f"unsupported scheme {scheme!r}")


@functools.cache
def _s3_client() -> Any:
    try:
        import boto3
    except ImportError as e:  # a dependency of the package; only missing in a broken install
        raise StorageError("s3:// writes need boto3 (pip install boto3)") from e
    return boto3.client("s3")


# ----------------------------------------------------------------------------- reads


def read_bytes(loc: Location) -> bytes:
    """The object's bytes; FileNotFoundError when it is absent."""
    if loc.local:
        return Path(loc.path).read_bytes()
    try:
        with loc.filesystem.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(loc.uri) from e
        raise StorageError(f"cannot read {loc.uri}: {e}") from e


def is_file(loc: Location) -> bool:
    if loc.local:
        return os.path.isfile(loc.path)
    return loc.filesystem.get_file_info(loc.path).type == pafs.FileType.File


def list_dir(loc: Location) -> list[tuple[str, bool]]:
    """(name, is_dir) of the direct children, sorted by name; [] when the directory is absent."""
    if loc.local:
        try:
            return sorted((e.name, e.is_dir()) for e in os.scandir(loc.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def newest_mtime(loc: Location) -> float | None:
    """The latest modification time (epoch seconds) of any file under `loc`; None when there is none."""
    if loc.local:
        times = [p.stat().st_mtime for p in Path(loc.path).rglob("*") if p.is_file()]
        return max(times, default=None)
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    return max(times, default=None)


# ----------------------------------------------------------------------------- writes


def write_bytes(loc: Location, data: bytes) -> None:
    """Write (or replace) one object so a reader sees the old bytes or the new, never a part."""
    if loc.local:
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with loc.filesystem.open_output_stream(loc.path) as f:  # one PUT: S3 objects appear whole
        f.write(data)


def create_exclusive(loc: Location, data: bytes) -> None:
    """Write `data` only if nothing is at `loc` (atomic); raise `AlreadyExists` otherwise."""
    if loc.local:
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)  # complete content, and fails if the name is taken: no torn or lost write
        except FileExistsError:
            raise AlreadyExists(f"{loc.uri} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        return
    if loc.scheme != "s3":
        raise StorageError(
            f"{loc.uri}: conditional writes (publish, alias compare-and-swap) are implemented for local "
            "paths and s3:// only; serve gs:// bundles by id, or keep the registry on S3 or a shared path"
        )
    import botocore.exceptions

    bucket, _, key = loc.path.partition("/")
    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or e.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode"
        ) in (409, 412):
            raise AlreadyExists(f"{loc.uri} already exists") from None
        raise StorageError(f"cannot write {loc.uri}: {e}") from e


def delete_tree(loc: Location) -> None:
    """Remove a directory and everything under it (absent: nothing to do)."""
    if loc.local:
        shutil.rmtree(loc.path, ignore_errors=True)
        return
    try:
        loc.filesystem.delete_dir(loc.path)
    except FileNotFoundError:
        pass


def delete_file(loc: Location) -> None:
    if loc.local:
        Path(loc.path).unlink(missing_ok=True)
        return
    try:
        loc.filesystem.delete_file(loc.path)
    except FileNotFoundError:
        pass


def upload_file(src: Path, loc: Location) -> None:
    """Copy a local file to `loc` (atomic for readers, like `write_bytes`)."""
    if loc.local:
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)  # mkstemp is owner-only; bundles are read by serving processes
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    pafs.copy_files(str(src), loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.filesystem)


def download_file(loc: Location, dst: Path) -> None:
    if loc.local:
        shutil.copyfile(loc.path, dst)
        return
    pafs.copy_files(loc.path, str(dst), source_filesystem=loc.filesystem, destination_filesystem=pafs.LocalFileSystem())
