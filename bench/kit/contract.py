"""The rerank HTTP contract: what a well-formed response to a request body is, checked under load."""

from __future__ import annotations

from typing import Any

from kit.bodies import Body
from kit.load import RecordingLoadGen


def check_response(out: Any, body: Body) -> str | None:
    """None if `out` is a well-formed rerank response for `body`, else what is wrong.

    - fallback set -> the upstream order, nothing scored, not calibrated;
    - no model (control without a bundle) -> the upstream order;
    - model -> the window sorted by score (ties by upstream index), the tail in upstream order,
      probabilities in [0, 1] iff calibrated.
    """
    if not isinstance(out, dict) or set(out) != {
        "request_id",
        "model_version",
        "arm",
        "shadow",
        "fallback",
        "calibrated",
        "results",
    }:
        return f"bad response keys: {str(out)[:200]}"
    res = out["results"]
    n = len(body.ids)
    if len(res) != n or [x["rank"] for x in res] != list(range(n)):
        return f"{len(res)} results for {n} candidates or bad ranks"
    if any(body.ids[x["index"]] != x["id"] for x in res):
        return "id does not match its upstream index"
    idx = [x["index"] for x in res]
    if out["fallback"] is not None or out["model_version"] is None:
        if idx != list(range(n)) or any(x["reranked"] or x["score"] is not None for x in res):
            return f"fallback {out['fallback']!r} but not the upstream order"
        if out["calibrated"]:
            return "calibrated without a model"
        return None
    w = body.window
    head, tail = res[:w], res[w:]
    if sorted(x["index"] for x in head) != list(range(w)) or [x["index"] for x in tail] != list(range(w, n)):
        return "window/tail split broken"
    if not all(x["reranked"] for x in head) or any(x["reranked"] for x in tail):
        return "reranked flags wrong"
    for a, b in zip(head[:-1], head[1:]):
        if not (a["score"] > b["score"] or (a["score"] == b["score"] and a["index"] < b["index"])):
            return "window not ordered by the scorer's logits"
    probs = [x["probability"] for x in head]
    if out["calibrated"]:
        if not all(p is not None and 0.0 <= p <= 1.0 for p in probs):
            return "calibrated but probabilities missing or outside [0, 1]"
    elif any(p is not None for p in probs):
        return "probabilities present although calibrated is false"
    return None


class LoadGen(RecordingLoadGen):
    """`kit.load.RecordingLoadGen` checking every 200 against the rerank contract (`check_response`)."""

    check_response = staticmethod(check_response)
