"""The data wing's Ray shell: run independent calls of a plain function as Ray tasks.

The synthetic generator (and, next, the converter) writes Parquet shards that do not depend on
each other; each shard is one task, so a cluster writes them in parallel. The functions run here
are Ray-free and seeded by their arguments only, so what they write is identical whichever
process, node or order runs them; this module is the only place of the data wing that imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray


def run_tasks(fn: Callable[..., Any], calls: list[dict[str, Any]], *, num_cpus: float = 1) -> list[Any]:
    """``[fn(**kw) for kw in calls]``, each call a Ray task of `num_cpus` CPUs; results in call order.

    Attaches to a running cluster (``RAY_ADDRESS`` / ``ray start``), else starts a local Ray, as
    the training job does. A task that raises fails the whole call with its error.
    """
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=num_cpus)(fn)
    return ray.get([task.remote(**kw) for kw in calls])
