"""The package's shape, enforced by reading its imports (ast): the Ray rule and the wing direction.

Only the Ray shells import `ray` (the Serve deployments and app builder, the Train job, the demo that
starts a local cluster); everything else runs and tests without it. Wings depend downwards only:
core on nothing of ours; data, bundles, experiments and the settings module on core; training and
serving on those below them. A new module lands in a wing and inherits its rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cotrr_ray"

# data/parallel.py: one Ray task per Parquet shard (the parallel synthetic generator); the shard
# writers it runs stay Ray-free in data/synthetic.py and data/parquet.py. batch/pipeline.py: the Ray
# Data graph of offline reranking; the actor's work is Ray-free in batch/rerank.py.
# serving/rollout_actor.py: the rollout controller's detached actor; the controller is Ray-free in
# experiments/controller.py. training/ingest.py: the training job's Ray Data path (reads, splits,
# the normaliser's aggregation, Train shards, split scoring); its transforms are Ray-free in
# data/collate.py.
RAY_SHELLS = {
    "training/ingest.py",
    "serving/deployments.py",
    "serving/rollout_actor.py",
    "serving/app.py",
    "training/job.py",
    "demo.py",
    "data/parallel.py",
    "batch/pipeline.py",
}

# wing -> the wings of ours it may import ("config" is the settings module, "cotrr_ray" the root's __version__)
ALLOWED = {
    "core": set(),
    "storage": set(),  # local paths and object stores (pyarrow.fs): bundles, datasets, event logs
    "data": {"core", "storage"},
    "bundles": {"core", "storage", "cotrr_ray"},
    "experiments": {"core", "storage"},
    "config": {"core"},
    "training": {"core", "data", "bundles", "storage", "config"},
    "serving": {"core", "data", "bundles", "experiments", "storage", "config", "cotrr_ray"},
    "batch": {"core", "data", "bundles", "serving", "storage"},  # offline reranking through serving's core
    "demo": {"core", "data", "training", "serving", "bundles", "config"},
    "evaluate": {"training"},
    "registry": {"bundles"},
    "__init__": set(),
}
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def wing(path: Path) -> str:
    return rel(path).split("/")[0].removesuffix(".py")


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module this file imports, at any depth (lazy imports inside functions count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{rel(path)}:{node.lineno}: relative import; write the absolute module path")
            out.append((node.lineno, node.module or ""))
    return out


def test_every_module_sits_in_a_known_wing():
    assert {wing(p) for p in modules()} <= set(ALLOWED)


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_only_ray_shells_import_ray(path: Path):
    if rel(path) in RAY_SHELLS:
        return
    ray_imports = [
        f"{rel(path)}:{line} imports {m}" for line, m in imported(path) if m == "ray" or m.startswith("ray.")
    ]
    assert not ray_imports, f"only {sorted(RAY_SHELLS)} may import ray: {ray_imports}"


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_wings_import_downwards(path: Path):
    me = wing(path)
    ours = [(line, m) for line, m in imported(path) if m == "cotrr_ray" or m.startswith("cotrr_ray.")]
    used = {(line, "cotrr_ray" if m == "cotrr_ray" else m.split(".")[1]) for line, m in ours}
    bad = [f"{rel(path)}:{line} imports the {w} wing" for line, w in used if w != me and w not in ALLOWED[me]]
    assert not bad, f"{me} may import only {sorted(ALLOWED[me])}: {bad}"


def test_the_rule_catches_a_violation(tmp_path: Path):
    """The checks read real imports, lazy ones included: a planted violation is seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import ray.train\n    from cotrr_ray.serving import api\n")
    assert (2, "ray.train") in imported(bad)
    assert (3, "cotrr_ray.serving") in imported(bad)


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_no_function_over_80_lines(path: Path):
    long = [
        f"{rel(path)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these into named phases: {long}"
