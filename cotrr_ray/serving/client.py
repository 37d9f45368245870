"""The client side of the HTTP contract: a rerank request body from a labelled record (demo, benches, cluster checks)."""

from __future__ import annotations


def request_from_record(rec: dict, *, unit_id: str | None = None, **extra: object) -> tuple[dict, dict[str, float]]:
    """A rerank request body (dict) from a record, and the labels it leaves out, by candidate id.

    `extra` (e.g. `top_n`) is added to the body as given.
    """
    labels = {c["id"]: c["label"] for c in rec["candidates"] if "label" in c}
    body: dict = {"query": {"id": rec["id"], "features": rec["features"]}}
    if unit_id is not None:
        body["unit_id"] = unit_id
    body["candidates"] = [{k: v for k, v in c.items() if k != "label"} for c in rec["candidates"]]
    return {**body, **extra}, labels
