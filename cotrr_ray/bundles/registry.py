"""The bundle registry: immutable bundles and moving aliases, on a local path or object storage.

    <registry>/
      registry.json                        marker (format version), written on first publish
      <name>/                              a model: the bundles of one training lineage
        <bundle_id>/                       one bundle (see bundle.py), written once, never rewritten;
          manifest.json                    written LAST: a bundle without it is not published
          model.pt, ...
        _aliases/<alias>/<seq>.json        one record per alias move, created exclusively

Publishing uploads every file but the manifest, re-reads and verifies each one against the
manifest's sha256, then creates the manifest with a conditional write: a reader sees the whole
bundle or none of it, and a second publish of an existing id fails.

An alias (`production`, `candidate`, any name) is the newest record of its history. Moving it
creates record seq+1 with a conditional write, after checking the newest record names the bundle
the caller expected: of two concurrent promoters exactly one wins; the other gets `AliasConflict`
(compare-and-swap, never a silently lost update). The records are the history (who, when,
from, to, why) that rollback walks.

A bundle is named by URI: `<registry>/<name>/<bundle_id>` (a fixed version, which is also a plain
bundle directory) or `<registry>/<name>@<alias>` (whatever the alias names when it is read).
`BundleSource` parses both, plus any plain bundle directory, and `fetch` brings a remote bundle into
a local cache keyed by id and verified by its checksums, so a replica needs only the object store.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cotrr_ray import storage
from cotrr_ray.bundles.bundle import MANIFEST, BundleError
from cotrr_ray.storage import AlreadyExists, Location, locate

MARKER = "registry.json"
ALIASES = "_aliases"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
CACHE_ENV = "COTRR_BUNDLE_CACHE"


class RegistryError(BundleError):
    """A registry, model, bundle or alias is missing or invalid; the message names it."""


class AliasConflict(RegistryError):
    """The alias moved since the caller read it (compare-and-swap lost); read it again and retry."""


def _check(kind: str, value: str, pattern: re.Pattern) -> str:
    if not pattern.fullmatch(value):
        raise RegistryError(f"invalid {kind} {value!r}: must match {pattern.pattern}")
    return value


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AliasMove:
    """One record of an alias's history: it named `previous` and from then on names `bundle_id`."""

    alias: str
    seq: int
    bundle_id: str
    previous: str | None
    by: str
    at: str
    reason: str

    @classmethod
    def from_json(cls, data: bytes) -> AliasMove:
        return cls(**json.loads(data))


class Registry:
    """One registry root (local path or ``s3://bucket/prefix``)."""

    def __init__(self, root: str | Location, base_dir: str | Path | None = None):
        self.root = root if isinstance(root, Location) else locate(root, base_dir)

    @property
    def uri(self) -> str:
        return self.root.uri

    def exists(self) -> bool:
        return storage.is_file(self.root.child(MARKER))

    def require(self) -> Registry:
        if not self.exists():
            raise RegistryError(
                f"no registry at {self.uri} (no {MARKER}); publish a bundle into it first, e.g. "
                "`python train_job.py --config configs/demo.yaml`"
            )
        return self

    # ------------------------------------------------------------------ bundles

    def _model(self, name: str) -> Location:
        return self.root.child(_check("model name", name, NAME_RE))

    def bundle_location(self, name: str, bundle_id: str) -> Location:
        if bundle_id.startswith("_") or "/" in bundle_id or not bundle_id:
            raise RegistryError(f"invalid bundle id {bundle_id!r}")
        return self._model(name).child(bundle_id)

    def bundle_uri(self, name: str, bundle_id: str) -> str:
        return self.bundle_location(name, bundle_id).uri

    def names(self) -> list[str]:
        self.require()
        return [n for n, is_dir in storage.list_dir(self.root) if is_dir and NAME_RE.fullmatch(n)]

    def manifest(self, name: str, bundle_id: str) -> dict[str, Any]:
        loc = self.bundle_location(name, bundle_id)
        try:
            return json.loads(storage.read_bytes(loc.child(MANIFEST)))
        except FileNotFoundError:
            self.require()
            partial = any(True for _ in storage.list_dir(loc))
            why = "an unfinished publish (files without a manifest)" if partial else "no such bundle"
            raise RegistryError(f"bundle {bundle_id!r} of model {name!r} is not in {self.uri}: {why}") from None

    def bundles(self, name: str) -> list[dict[str, Any]]:
        """Manifests of the published bundles of `name`, oldest first (unfinished publishes skipped)."""
        self.require()
        out = []
        for entry, is_dir in storage.list_dir(self._model(name)):
            if not is_dir or entry.startswith("_"):
                continue
            try:
                out.append(json.loads(storage.read_bytes(self._model(name).child(entry, MANIFEST))))
            except FileNotFoundError:
                continue
        return sorted(out, key=lambda m: (m.get("created_at", ""), m["bundle_id"]))

    def publish(self, bundle_dir: str | Path, name: str) -> str:
        """Copy a finished local bundle directory in under its manifest's id; returns the bundle URI.

        Files first (each re-read and checked against the manifest's sha256), the manifest last with
        a conditional write: a reader sees all of the bundle or none, and an existing id is refused.
        """
        src = Path(bundle_dir)
        manifest_bytes = (src / MANIFEST).read_bytes()
        manifest = json.loads(manifest_bytes)
        bundle_id = str(manifest["bundle_id"])
        target = self.bundle_location(name, bundle_id)
        if storage.is_file(target.child(MANIFEST)):
            raise RegistryError(f"bundle {bundle_id} is already published at {target.uri}; bundles are immutable")
        try:
            storage.create_exclusive(self.root.child(MARKER), _json({"format_version": FORMAT_VERSION}))
        except AlreadyExists:
            pass
        for file, digest in manifest["files"].items():
            storage.upload_file(src / file, target.child(file))
            if _sha256(storage.read_bytes(target.child(file))) != digest:
                raise RegistryError(f"{target.child(file).uri}: uploaded bytes do not match the manifest's sha256")
        try:
            storage.create_exclusive(target.child(MANIFEST), manifest_bytes)
        except AlreadyExists:
            raise RegistryError(f"bundle {bundle_id} was published concurrently at {target.uri}") from None
        return target.uri

    def delete(self, name: str, bundle_id: str) -> None:
        """Unpublish (manifest first, so readers stop seeing it at once), then remove the files."""
        loc = self.bundle_location(name, bundle_id)
        storage.delete_file(loc.child(MANIFEST))
        storage.delete_tree(loc)

    # ------------------------------------------------------------------ aliases

    def _alias_dir(self, name: str, alias: str) -> Location:
        return self._model(name).child(ALIASES, _check("alias", alias, ALIAS_RE))

    def history(self, name: str, alias: str) -> list[AliasMove]:
        """Every move of `alias`, oldest first ([] when it was never set)."""
        d = self._alias_dir(name, alias)
        records = sorted(n for n, is_dir in storage.list_dir(d) if not is_dir and n.endswith(".json"))
        return [AliasMove.from_json(storage.read_bytes(d.child(r))) for r in records]

    def head(self, name: str, alias: str) -> AliasMove | None:
        """The newest move of `alias` (what it names now), or None. One LIST and one GET."""
        d = self._alias_dir(name, alias)
        records = [n for n, is_dir in storage.list_dir(d) if not is_dir and n.endswith(".json")]
        return AliasMove.from_json(storage.read_bytes(d.child(max(records)))) if records else None

    def aliases(self, name: str) -> dict[str, str]:
        """{alias: bundle_id} of every alias of `name`."""
        out = {}
        for alias, is_dir in storage.list_dir(self._model(name).child(ALIASES)):
            head = self.head(name, alias) if is_dir and ALIAS_RE.fullmatch(alias) else None
            if head is not None:
                out[alias] = head.bundle_id
        return out

    def resolve(self, name: str, alias: str) -> str:
        head = self.head(name, alias)
        if head is None:
            self.require()
            known = sorted(self.aliases(name))
            raise RegistryError(f"alias {alias!r} of model {name!r} is not set in {self.uri} (set: {known})")
        return head.bundle_id

    _CURRENT = object()

    def set_alias(
        self, name: str, alias: str, bundle_id: str, *, expected: Any = _CURRENT, reason: str = "set"
    ) -> AliasMove:
        """Point `alias` at a published bundle, if it still names `expected` (None: unset).

        Without `expected`, the value read just before the write is expected: a concurrent move
        between that read and the write still makes this call fail with `AliasConflict`.
        """
        self.manifest(name, bundle_id)  # only published bundles can be aliased
        head = self.head(name, alias)
        current = head.bundle_id if head else None
        if expected is not Registry._CURRENT and expected != current:
            raise AliasConflict(f"alias {alias!r} names {current!r}, not the expected {expected!r}")
        move = AliasMove(
            alias=alias,
            seq=(head.seq + 1) if head else 1,
            bundle_id=bundle_id,
            previous=current,
            by=_actor(),
            at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            reason=reason,
        )
        try:
            storage.create_exclusive(self._alias_dir(name, alias).child(f"{move.seq:010d}.json"), _json(asdict(move)))
        except AlreadyExists:
            raise AliasConflict(f"alias {alias!r} of {name!r} was moved concurrently; read it again") from None
        return move

    def promote(self, name: str, source: str = "candidate", target: str = "production") -> AliasMove:
        """Point `target` at what `source` names now."""
        bundle_id = self.resolve(name, source)
        return self.set_alias(name, target, bundle_id, reason=f"promote {source}")

    def rollback(self, name: str, alias: str = "production") -> AliasMove:
        """Point `alias` back at the bundle it named before its last move."""
        head = self.head(name, alias)
        if head is None:
            self.resolve(name, alias)  # raises the 'not set' error
        assert head is not None
        if head.previous is None:
            raise RegistryError(f"alias {alias!r} of {name!r} has no previous bundle to roll back to")
        return self.set_alias(name, alias, head.previous, expected=head.bundle_id, reason=f"rollback of {head.seq}")

    def protected(self, name: str) -> set[str]:
        """Bundles gc must keep: what every alias names, and what it named before (rollback's target)."""
        keep = set()
        for alias in self.aliases(name):
            head = self.head(name, alias)
            if head is not None:
                keep.add(head.bundle_id)
                if head.previous:
                    keep.add(head.previous)
        return keep

    def unfinished(self, name: str, older_than_s: float) -> list[str]:
        """Ids of publishes that never wrote their manifest (killed mid-write), idle for `older_than_s`.

        The age keeps gc off a publish that is still uploading."""
        now, out = time.time(), []
        for entry, is_dir in storage.list_dir(self._model(name)):
            loc = self._model(name).child(entry)
            if is_dir and not entry.startswith("_") and not storage.is_file(loc.child(MANIFEST)):
                mtime = storage.newest_mtime(loc)
                if mtime is None or now - mtime > older_than_s:
                    out.append(entry)
        return out

    def gc(self, name: str, keep: int, *, dry_run: bool = False, unfinished_after_s: float = 3600.0) -> list[str]:
        """Delete all but the `keep` newest bundles, never an aliased one or a rollback target, and the
        leftovers of publishes that died before their manifest (idle for `unfinished_after_s`)."""
        if keep < 0:
            raise RegistryError("gc --keep must be >= 0")
        published = [m["bundle_id"] for m in self.bundles(name)]
        newest = set(published[-keep:]) if keep else set()
        doomed = [b for b in published if b not in newest and b not in self.protected(name)]
        doomed += self.unfinished(name, unfinished_after_s)
        if not dry_run:
            for bundle_id in doomed:
                self.delete(name, bundle_id)
        return doomed

    # ------------------------------------------------------------------ local copies

    def fetch(self, name: str, bundle_id: str, cache_dir: str | Path | None = None) -> Path:
        """A local directory holding the bundle: itself for a local registry, else a verified cache copy."""
        return fetch_bundle(self.bundle_location(name, bundle_id), cache_dir)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cotrr-ray" / "bundles"


def matches_manifest(directory: Path, manifest: dict[str, Any]) -> bool:
    """True when every file the manifest lists is in `directory` with its sha256 (the manifest itself aside)."""
    from cotrr_ray.bundles.bundle import sha256_file

    for file, digest in manifest.get("files", {}).items():
        f = directory / file
        if not f.is_file() or sha256_file(f) != digest:
            return False
    return True


def fetch_bundle(loc: Location, cache_dir: str | Path | None = None) -> Path:
    """A local directory with the bundle at `loc`: `loc` itself when local, else `<cache>/<bundle_id>`.

    A remote bundle is downloaded into a temp directory beside the cache entry, every file checked
    against the manifest's sha256, then renamed into place; a cached copy is re-verified before use.
    """
    try:
        manifest_bytes = storage.read_bytes(loc.child(MANIFEST))
    except FileNotFoundError:
        raise RegistryError(f"no published bundle at {loc.uri} (no {MANIFEST})") from None
    if loc.local:
        return Path(loc.path)
    manifest = json.loads(manifest_bytes)
    bundle_id = str(manifest["bundle_id"])
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / bundle_id
    if entry.is_dir() and matches_manifest(entry, manifest):
        return entry
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_id}.", dir=cache))
    try:
        for file in manifest["files"]:
            storage.download_file(loc.child(file), tmp / file)
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        if not matches_manifest(tmp, manifest):
            raise RegistryError(f"{loc.uri}: downloaded files do not match the manifest's checksums")
        tmp.chmod(0o755)
        if entry.exists():  # a stale or corrupt copy (or another replica's, just renamed in)
            if matches_manifest(entry, manifest):
                return entry
            os.rename(entry, cache / f".{bundle_id}.stale.{uuid.uuid4().hex[:8]}")
        os.rename(tmp, entry)
    finally:
        if tmp.exists():
            storage.delete_tree(storage.locate(tmp))
    return entry


# ----------------------------------------------------------------------------- names for bundles


@dataclass(frozen=True)
class BundleSource:
    """What a `bundle_uri` names: a bundle directory (local or remote), or a registry alias.

    - ``<dir>`` / ``file://<dir>`` / ``s3://bucket/<registry>/<name>/<bundle_id>``: that bundle;
    - ``<registry>/<name>@<alias>``: the bundle the alias names when `current_id`/`resolve` run.
    """

    location: Location  # the bundle directory, or the model directory of an alias
    alias: str | None = None

    @classmethod
    def parse(cls, uri: str, base_dir: str | Path | None = None) -> BundleSource:
        head, sep, alias = str(uri).rpartition("@")
        if sep and "/" not in alias:
            _check("alias", alias, ALIAS_RE)
            return cls(locate(head, base_dir), alias)
        return cls(locate(uri, base_dir))

    @property
    def uri(self) -> str:
        return f"{self.location.uri}@{self.alias}" if self.alias else self.location.uri

    @property
    def moving(self) -> bool:
        return self.alias is not None

    def registry(self) -> tuple[Registry, str]:
        return Registry(self.location.parent), self.location.name

    def current(self) -> tuple[str | None, Location]:
        """(bundle id, bundle location): the id is None for a plain directory (read it from the manifest)."""
        if self.alias is None:
            return None, self.location
        registry, name = self.registry()
        bundle_id = registry.resolve(name, self.alias)
        return bundle_id, registry.bundle_location(name, bundle_id)

    def current_id(self) -> str:
        bundle_id, loc = self.current()
        if bundle_id is None:
            try:
                bundle_id = str(json.loads(storage.read_bytes(loc.child(MANIFEST)))["bundle_id"])
            except FileNotFoundError:
                raise RegistryError(f"no published bundle at {loc.uri} (no {MANIFEST})") from None
        return bundle_id

    def resolve(self, cache_dir: str | Path | None = None) -> tuple[str, Path]:
        """(bundle URI of the fixed version, local directory holding it)."""
        _, loc = self.current()
        return loc.uri, fetch_bundle(loc, cache_dir)


def resolve_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """A bundle URI in canonical form: local paths absolute (against `base_dir`), s3:// and @alias kept."""
    return BundleSource.parse(uri, base_dir).uri
