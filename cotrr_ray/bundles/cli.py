"""`python -m cotrr_ray.registry`: inspect a registry and move its aliases.

    python -m cotrr_ray.registry list    artifacts/registry            # models
    python -m cotrr_ray.registry list    artifacts/registry/demo       # bundles (newest last), aliases
    python -m cotrr_ray.registry show    artifacts/registry/demo ID|@ALIAS
    python -m cotrr_ray.registry alias   get|history artifacts/registry/demo ALIAS
    python -m cotrr_ray.registry alias   set artifacts/registry/demo ALIAS ID [--expect ID|none]
    python -m cotrr_ray.registry promote artifacts/registry/demo [--source candidate] [--target production]
    python -m cotrr_ray.registry rollback artifacts/registry/demo [--alias production]
    python -m cotrr_ray.registry gc      artifacts/registry/demo --keep N [--dry-run] [--unfinished-after-s S]

A model is named by `<registry>/<name>` (what `train_job.py` takes as `output`); the registry may
be a local path or ``s3://bucket/prefix``. Errors (missing registry, model, bundle or alias, a lost
compare-and-swap) print one line on stderr and exit 2. Output is JSON, for humans and scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from cotrr_ray.bundles.bundle import BundleError
from cotrr_ray.bundles.registry import BundleSource, Registry
from cotrr_ray.storage import StorageError


def _model(uri: str) -> tuple[Registry, str]:
    source = BundleSource.parse(uri)
    if source.alias:
        raise BundleError(f"{uri!r}: name a model (<registry>/<name>), not an alias")
    registry, name = source.registry()
    registry.require()
    return registry, name


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "bundle_id": m["bundle_id"],
        "created_at": m.get("created_at"),
        "headline_metrics": m.get("headline_metrics", {}),
        "data_fingerprint": m.get("data_fingerprint"),
    }


def cmd_list(args: argparse.Namespace) -> Any:
    root = Registry(args.uri)
    if root.exists():
        return {"registry": root.uri, "models": root.names()}
    registry, name = _model(args.uri)
    bundles = registry.bundles(name)
    if not bundles and name not in registry.names():
        raise BundleError(f"no model {name!r} in {registry.uri} (models: {registry.names()})")
    aliases = registry.aliases(name)
    by_id: dict[str, list[str]] = {}
    for alias, bundle_id in aliases.items():
        by_id.setdefault(bundle_id, []).append(alias)
    return {
        "model": f"{registry.uri}/{name}",
        "aliases": aliases,
        "bundles": [{**_summary(m), "aliases": sorted(by_id.get(m["bundle_id"], []))} for m in bundles],
    }


def cmd_show(args: argparse.Namespace) -> Any:
    registry, name = _model(args.uri)
    bundle_id = registry.resolve(name, args.ref[1:]) if args.ref.startswith("@") else args.ref
    return {"uri": registry.bundle_uri(name, bundle_id), "manifest": registry.manifest(name, bundle_id)}


def cmd_alias(args: argparse.Namespace) -> Any:
    registry, name = _model(args.uri)
    if args.action == "get":
        bundle_id = registry.resolve(name, args.alias)
        return {"alias": args.alias, "bundle_id": bundle_id, "uri": registry.bundle_uri(name, bundle_id)}
    if args.action == "history":
        return [asdict(m) for m in registry.history(name, args.alias)]
    if args.bundle_id is None:
        raise BundleError("alias set needs a bundle id")
    kwargs = {} if args.expect is None else {"expected": None if args.expect == "none" else args.expect}
    return asdict(registry.set_alias(name, args.alias, args.bundle_id, **kwargs))


def cmd_promote(args: argparse.Namespace) -> Any:
    registry, name = _model(args.uri)
    return asdict(registry.promote(name, args.source, args.target))


def cmd_rollback(args: argparse.Namespace) -> Any:
    registry, name = _model(args.uri)
    return asdict(registry.rollback(name, args.alias))


def cmd_gc(args: argparse.Namespace) -> Any:
    registry, name = _model(args.uri)
    deleted = registry.gc(name, args.keep, dry_run=args.dry_run, unfinished_after_s=args.unfinished_after_s)
    return {
        "deleted" if not args.dry_run else "would_delete": deleted,
        "kept_aliased": sorted(registry.protected(name)),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.registry", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="models of a registry, or bundles and aliases of a model")
    s.add_argument("uri")
    s.set_defaults(fn=cmd_list)
    s = sub.add_parser("show", help="manifest of one bundle")
    s.add_argument("uri")
    s.add_argument("ref", help="bundle id, or @alias")
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser("alias", help="get, set (compare-and-swap) or show the history of an alias")
    s.add_argument("action", choices=["get", "set", "history"])
    s.add_argument("uri")
    s.add_argument("alias")
    s.add_argument("bundle_id", nargs="?")
    s.add_argument("--expect", default=None, help="set only if the alias names this id now ('none': unset)")
    s.set_defaults(fn=cmd_alias)
    s = sub.add_parser("promote", help="point --target at what --source names")
    s.add_argument("uri")
    s.add_argument("--source", default="candidate")
    s.add_argument("--target", default="production")
    s.set_defaults(fn=cmd_promote)
    s = sub.add_parser("rollback", help="point an alias back at the bundle it named before its last move")
    s.add_argument("uri")
    s.add_argument("--alias", default="production")
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("gc", help="delete all but the newest N bundles; never an aliased one")
    s.add_argument("uri")
    s.add_argument("--keep", type=int, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument(
        "--unfinished-after-s",
        type=float,
        default=3600.0,
        help="also delete publishes that died before their manifest, once idle this long",
    )
    s.set_defaults(fn=cmd_gc)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = args.fn(args)
    except (BundleError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0
