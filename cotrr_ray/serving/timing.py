"""Per-request stage timings and the W3C `Server-Timing` header that carries them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StageTimings:
    """Wall times (ms) of one rerank request's stages, as the router sees them; None: did not happen.

    Filled by `RerankService.handle_http` (`read`) and `RerankService.rerank` (the rest), and sent back as the W3C
    `Server-Timing` response header, so a client or a browser's devtools sees where a request's time
    went. A stage is recorded only when it succeeded: a fallback carries `parse` and `total` only.

    - read: the request body received from the ASGI stream (HTTP layer, before `total` starts);
    - parse: body -> validated `ParsedRequest` (`RequestParser.parse`);
    - score: the scorer call's round trip from the router (the coalescer's wait for a free call slot,
      the handle hop, the @serve.batch queue, the model); an in-process call in the peer;
    - model: the scorer's own compute for the batch that held this window (`ScoreResult.compute_ms`;
      the whole batch's time, so `score - model` is transport and queueing);
    - calibrate: the calibrator call's round trip (absent in fused mode: the scorer calibrates);
    - total: the router's handling time, parse to response payload (exposure record and metrics included).
    """

    read: float | None = None
    parse: float | None = None
    score: float | None = None
    model: float | None = None
    calibrate: float | None = None
    total: float | None = None

    def header(self) -> str:
        """The `Server-Timing` value: `parse;dur=1.234, score;dur=3.100, ..., total;dur=6.200`."""
        return ", ".join(f"{name};dur={v:.3f}" for name in _STAGES if (v := getattr(self, name)) is not None)


_STAGES = tuple(StageTimings.__dataclass_fields__)

SERVER_TIMING = "Server-Timing"
"""The response header's name."""


def parse_server_timing(value: str) -> dict[str, float]:
    """`{name: dur}` of a `Server-Timing` header value (entries without a `dur` are left out)."""
    out = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, v = param.partition("=")
            if key.strip().lower() == "dur" and name:
                out[name] = float(v.strip().strip('"'))
    return out
