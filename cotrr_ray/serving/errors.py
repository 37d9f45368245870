"""The serving path's errors: what the client is told (`RequestError`, HTTP status) and how a
downstream failure is named (`InvalidOutput`, `exception_name`).

Bad input is always a 4xx with the body ``{"error": {"code", "message", "field"}}``; `field` is a
JSON path into the request (``candidates[3].features.visual``) or null. Downstream failures are
never errors for the client: the router answers 200 with the upstream order and a `fallback`
reason such as ``scorer_error:<exception_name>`` (see `cotrr_ray.serving.service`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cotrr_ray.core.features import RecordError

STATUS = {
    "invalid_json": 422,  # body is not JSON
    "invalid_request": 422,  # schema or feature-spec violation (dims, NaN, groups, ids, ranges)
    "body_too_large": 413,  # content-length or actual body above AppArgs.max_body_bytes
    "too_many_candidates": 413,  # more than AppArgs.max_candidates
    "too_many_events": 413,  # a feedback batch above EventLogConfig.max_events_per_batch
    "not_found": 404,
    "method_not_allowed": 405,
    "not_ready": 503,
    "overloaded": 503,
    "log_unavailable": 503,  # the event log could not write (disk full, I/O error): retry the batch later
    "internal": 500,  # a bug in the router, never bad input (logged with the request id)
}
"""Error code -> HTTP status. The code is part of the API; the message is for humans."""

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 503: "not_ready"}
"""HTTP status -> error code of the framework's own errors (unknown route, wrong method); others: http_error."""


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message, "field": field}}


class RequestError(Exception):
    """A request the router refuses; `status` comes from `STATUS[code]`."""

    def __init__(self, code: str, message: str, field: str | None = None):
        if code not in STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r}, field={self.field!r})"


# pydantic adds the tag of the union member it tried (`list[float]`, `str`) to `loc`; not a JSON path.
_UNION_TAGS = {"list[float]", "str", "float", "int"}


def _json_path(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path += f".{part}" if path else str(part)
    return path or None  # the body as a whole


def from_validation_error(err: ValidationError) -> RequestError:
    """The most useful pydantic error as one `RequestError` (422, or invalid_json).

    A value that fails every member of a union (a vector given as a number, say) produces one
    error per member; the one that is not a plain type mismatch names the real problem (e.g.
    `finite_number` for NaN inside a list), so it wins.
    """
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        first = next(e for e in errors if e["type"] == "json_invalid")
        return RequestError("invalid_json", f"body is not valid JSON: {first['msg']}")
    best = min(errors, key=lambda e: (e["type"].endswith("_type"), len(e["loc"]) == 0))
    return RequestError("invalid_request", best["msg"], _json_path(tuple(best["loc"])))


def from_record_error(err: RecordError) -> RequestError:
    """A feature-spec violation from `features.to_candidate_list`.

    Its field is already a path into the HTTP body (`query.features.<g>`, `candidates[i]...`).
    """
    return RequestError("invalid_request", err.message, err.field)


class InvalidOutput(ValueError):
    """A downstream deployment answered with something unusable (wrong shape, NaN, out of range)."""


def exception_name(e: BaseException) -> str:
    """The user-level exception type: Ray wraps remote errors (`RayTaskError(X)`, `.cause`)."""
    cause = getattr(e, "cause", None)
    return type(cause).__name__ if isinstance(cause, BaseException) else type(e).__name__
