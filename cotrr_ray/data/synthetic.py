"""The synthetic data generator (``python -m cotrr_ray.data.synthetic generate --out data.jsonl --queries 2000``).

A planted image-search world in the default feature spec, built so that "upstream order",
"a learned list-aware model" and "the oracle" differ measurably:

* Each query has a latent intent ``u`` (unit vector in R^512). Its CLIP text embedding is
  ``normalize(u + noise)``.
* Each candidate has a topicality ``a ~ Beta(2, 2)`` and content ``v = normalize(a*u + sqrt(1-a^2)*w)``
  with ``w`` random. Its image embedding is ``normalize(v + small noise)``; its caption (text)
  embedding is ``normalize(v + larger noise)``.
* ``visual`` (8 attributes, standard normal): the first three carry a hidden aesthetic quality
  ``q = 0.6*x0 + 0.3*x1 - 0.3*x2``; the rest are distractors.
* ``conflict`` (5 scores in [0,1]): a hidden conflict flag (15% of candidates, e.g. "no glass on a
  cocktail image") raises all five scores noisily; the last one is the strongest indicator.
* Near duplicates: ~12% of candidates are re-uploads of another candidate in the same list (same
  content, image embedding perturbed slightly).
* Upstream score = cos(image embedding, query embedding) + noise: informative about topicality but
  blind to quality, conflicts and duplicates. Candidates are listed in upstream-score order.
* True utility ``t = 4a + 0.5q - 2*conflict + N(0, 0.3)``, graded into labels 0..4 by fixed
  thresholds. List context: every near duplicate after the first (in upstream order) of its
  group is redundant and gets label 0. Only a model that compares candidates with each other
  (self-attention across the list) can learn that rule.

Only the first ``--top-m`` candidates of each list carry features (as upstream would send them);
the tail carries ids, upstream scores and labels, and is kept in upstream order by the reranker.

Parquet (``generate --format parquet --shards K --output DIR_OR_URI [--ray]``): K shards of the
Parquet dataset format (`cotrr_ray.data.parquet`), written serially in this process or as one Ray
task per shard (``--ray``). Query ``k`` is drawn from its own generator, seeded by ``(seed, k)``, so
a shard (a fixed range of query indices) is a function of the seed and its index alone, and the
dataset is the same bytes whether one process or K tasks write it. (The JSONL path keeps its one
sequential stream, so existing seeds keep their data; the two paths give different queries.)
"""

from __future__ import annotations

import argparse
import base64
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cotrr_ray.core.features import CandidateList, to_candidate_list
from cotrr_ray.core.schema import QueryRecord
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.data.parquet import (
    DEFAULT_QUERIES_PER_ROW_GROUP,
    ShardInfo,
    check_output,
    shard_name,
    write_manifest,
    write_shard,
)
from cotrr_ray.data.readers import read_jsonl
from cotrr_ray.storage import locate


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _b64(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()


def generate_query(rng: np.random.Generator, qid: str, *, n: int, top_m: int, encoding: str = "base64") -> dict:
    """One synthetic query record (see the module docstring for the generative story)."""
    dim = IMAGE_SEARCH_SPEC.query["text_embedding"]
    enc = _b64 if encoding == "base64" else (lambda a: [round(float(v), 6) for v in a])

    def noise(scale: float, rows: int | None = None) -> np.ndarray:
        # Isotropic noise whose vector norm is about `scale`, whatever the dimension.
        shape = (dim,) if rows is None else (rows, dim)
        return scale * rng.standard_normal(shape) / np.sqrt(dim)

    u = _normalize(rng.standard_normal(dim))
    q = _normalize(u + noise(0.6))
    a = rng.beta(2.0, 2.0, n)
    w = _normalize(rng.standard_normal((n, dim)))
    v = _normalize(a[:, None] * u + np.sqrt(1 - a[:, None] ** 2) * w)
    visual = rng.standard_normal((n, 8))
    conflict_flag = rng.random(n) < 0.15
    # Near duplicates copy another candidate's content and attributes.
    dup_of = np.full(n, -1)
    for i in range(1, n):
        if rng.random() < 0.12:
            dup_of[i] = rng.integers(0, i)
            src = dup_of[i]
            while dup_of[src] >= 0:
                src = dup_of[src]
            dup_of[i] = src
            v[i], a[i], visual[i], conflict_flag[i] = v[src], a[src], visual[src], conflict_flag[src]
    img = _normalize(v + noise(0.3, n))
    txt = _normalize(v + noise(0.5, n))
    conflict = np.clip(
        0.15 + 0.45 * conflict_flag[:, None] * np.array([0.6, 0.7, 0.8, 0.9, 1.0]) + 0.15 * rng.standard_normal((n, 5)),
        0.0,
        1.0,
    )
    quality = 0.6 * visual[:, 0] + 0.3 * visual[:, 1] - 0.3 * visual[:, 2]
    utility = 4.0 * a + 0.5 * quality - 2.0 * conflict_flag + 0.3 * rng.standard_normal(n)
    labels = np.digitize(utility, [1.5, 2.3, 3.0, 3.6]).astype(float)
    upstream = img @ q + 0.1 * rng.standard_normal(n)
    order = np.argsort(-upstream, kind="stable")
    # Redundancy is a property of the list: later copies (in upstream order) are worth nothing.
    group = np.where(dup_of >= 0, dup_of, np.arange(n))
    seen: set[int] = set()
    for i in order:
        if group[i] in seen:
            labels[i] = 0.0
        seen.add(int(group[i]))
    candidates = []
    for rank, i in enumerate(order):
        c = {"id": f"{qid}-c{i}", "upstream_score": round(float(upstream[i]), 6), "label": float(labels[i])}
        if rank < top_m:
            c["features"] = {
                "image_embedding": enc(img[i]),
                "text_embedding": enc(txt[i]),
                "visual": enc(visual[i]),
                "conflict": enc(conflict[i]),
            }
        candidates.append(c)
    return {"id": qid, "features": {"text_embedding": enc(q)}, "candidates": candidates}


def generate(
    out: str | Path,
    *,
    queries: int,
    seed: int = 0,
    min_candidates: int = 20,
    max_candidates: int = 32,
    top_m: int = 20,
    encoding: str = "base64",
    progress: bool = True,
) -> Path:
    """Write `queries` synthetic queries to a JSONL file (deterministic for a given seed)."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out, "wb") as f:
        for k in tqdm(range(queries), desc=f"generate {out.name}", unit="query", disable=not progress):
            n = int(rng.integers(min_candidates, max_candidates + 1))
            rec = generate_query(rng, f"q{seed}-{k:06d}", n=n, top_m=top_m, encoding=encoding)
            f.write(orjson.dumps(rec) + b"\n")
    return out


def synthetic_lists(
    first: int, count: int, *, seed: int, min_candidates: int, max_candidates: int, top_m: int
) -> Iterator[CandidateList]:
    """Queries ``first .. first+count-1``, each from a generator seeded by (seed, query index), and
    validated by the same `to_candidate_list` as every reader."""
    for k in range(first, first + count):
        rng = np.random.default_rng([seed, k])
        n = int(rng.integers(min_candidates, max_candidates + 1))
        rec = QueryRecord.model_validate(generate_query(rng, f"q{seed}-{k:06d}", n=n, top_m=top_m))
        yield to_candidate_list(rec, IMAGE_SEARCH_SPEC, window=top_m, require_labels=True)


def write_synthetic_shard(
    output: str, index: int, *, first: int, count: int, queries_per_row_group: int, **gen: int
) -> ShardInfo:
    """One shard of a synthetic Parquet dataset (Ray-free; `cotrr_ray.data.parallel` runs it as a task)."""
    lists = synthetic_lists(first, count, **gen)
    target = locate(output).child(shard_name(index))
    return write_shard(
        target, lists, IMAGE_SEARCH_SPEC, window=gen["top_m"], queries_per_row_group=queries_per_row_group
    )


def generate_parquet(
    output: str | Path,
    *,
    queries: int,
    shards: int,
    seed: int = 0,
    min_candidates: int = 20,
    max_candidates: int = 32,
    top_m: int = 20,
    queries_per_row_group: int = DEFAULT_QUERIES_PER_ROW_GROUP,
    use_ray: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `queries` synthetic queries as `shards` Parquet shards (one Ray task each with
    `use_ray`); returns the manifest, written after every shard is complete."""
    if not 1 <= shards <= queries:
        raise ValueError(f"shards must be in 1..queries ({queries}), got {shards}")
    out = locate(output)
    check_output(out, overwrite=overwrite)
    per_shard = math.ceil(queries / shards)
    gen = dict(seed=seed, min_candidates=min_candidates, max_candidates=max_candidates, top_m=top_m)
    calls = [
        dict(output=out.uri, index=i, first=i * per_shard, count=min(per_shard, queries - i * per_shard), **gen)
        for i in range(shards)
        if i * per_shard < queries
    ]
    for c in calls:
        c["queries_per_row_group"] = min(queries_per_row_group, c["count"])
    if use_ray:
        from cotrr_ray.data.parallel import run_tasks

        infos = run_tasks(write_synthetic_shard, calls)
    else:
        infos = [write_synthetic_shard(**c) for c in calls]
    source = {"generator": "cotrr_ray.data.synthetic", "queries": queries, **gen}
    return write_manifest(out, IMAGE_SEARCH_SPEC, top_m, infos, source)


def _generate_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--out", "--output", dest="out", required=True, help="JSONL file, or Parquet dataset dir / URI")
    g.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    g.add_argument("--queries", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-candidates", type=int, default=20)
    g.add_argument("--max-candidates", type=int, default=32)
    g.add_argument("--top-m", type=int, default=20, help="candidates per list that carry features")
    g.add_argument("--encoding", choices=["base64", "list"], default="base64", help="jsonl only")
    g.add_argument("--shards", type=int, default=1, help="parquet: number of shards")
    g.add_argument("--queries-per-row-group", type=int, default=DEFAULT_QUERIES_PER_ROW_GROUP, help="parquet")
    g.add_argument("--ray", action="store_true", help="parquet: one Ray task per shard (RAY_ADDRESS or local)")
    g.add_argument("--overwrite", action="store_true", help="parquet: replace an existing dataset")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--"):  # `generate` is the default command
        argv.insert(0, "generate")
    p = argparse.ArgumentParser(prog="python -m cotrr_ray.data.synthetic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    _generate_args(sub.add_parser("generate", help="write a synthetic image-search dataset (JSONL or Parquet)"))
    v = sub.add_parser("validate", help="validate a JSONL file against the default spec")
    v.add_argument("path")
    v.add_argument("--window", type=int, default=20)
    args = p.parse_args(argv)
    if args.cmd == "validate":
        lists = read_jsonl(args.path, IMAGE_SEARCH_SPEC, window=args.window)
        print(f"{args.path}: {len(lists)} queries, {sum(map(len, lists))} candidates, all valid")
        return
    gen = dict(
        queries=args.queries,
        seed=args.seed,
        min_candidates=args.min_candidates,
        max_candidates=args.max_candidates,
        top_m=args.top_m,
    )
    if args.format == "parquet":
        m = generate_parquet(
            args.out,
            shards=args.shards,
            queries_per_row_group=args.queries_per_row_group,
            use_ray=args.ray,
            overwrite=args.overwrite,
            **gen,
        )
        print(f"{args.out}: {m['queries']} queries, {m['candidates']} candidates in {len(m['shards'])} shards")
    else:
        print(generate(args.out, encoding=args.encoding, **gen))


if __name__ == "__main__":
    main()
