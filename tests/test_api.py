"""Request validation and the error mapping, without Ray (RequestParser, read_body, errors)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
import pytest
from _bundles import TOP_M, modified, request_body
from fastapi import FastAPI, Request
from pydantic import ValidationError

from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.serving.api import RequestParser, RerankRequest, install_openapi, read_body
from cotrr_ray.serving.errors import STATUS, RequestError, from_validation_error

MAX_CANDIDATES = 20


@pytest.fixture(scope="module")
def parser() -> RequestParser:
    return RequestParser(IMAGE_SEARCH_SPEC, max_top_m=TOP_M, max_candidates=MAX_CANDIDATES)


@pytest.fixture(scope="module")
def body(records) -> dict:
    return request_body(records[0], encoding="list")


def parse(parser: RequestParser, raw: bytes, default_top_m: int = TOP_M):
    return parser.parse(raw, default_top_m=default_top_m)


def refused(parser: RequestParser, raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(parser, raw)
    return info.value


def test_valid_request_parses_to_window_arrays(parser, body) -> None:
    req = parse(parser, orjson.dumps(body))
    n = len(body["candidates"])
    assert req.ids == [c["id"] for c in body["candidates"]] and len(req.ids) == n
    assert req.window == TOP_M and len(req.inputs.ids) == TOP_M  # the tail is not sent to the scorer
    assert req.inputs.features["image_embedding"].shape == (TOP_M, 512)
    assert req.inputs.upstream.shape == (TOP_M,) and req.inputs.labels is None
    assert req.unit_id is None and req.top_n is None


def test_base64_and_list_encodings_give_identical_arrays(parser, records) -> None:
    a = parse(parser, orjson.dumps(request_body(records[1], encoding="list")))
    b = parse(parser, orjson.dumps(request_body(records[1], encoding="base64")))
    for g in IMAGE_SEARCH_SPEC.candidate:
        np.testing.assert_array_equal(a.inputs.features[g], b.inputs.features[g])
    np.testing.assert_array_equal(a.inputs.query_features["text_embedding"], b.inputs.query_features["text_embedding"])


def test_tail_candidates_may_omit_features_and_top_m_shrinks_the_window(parser, body) -> None:
    assert "features" not in body["candidates"][TOP_M]
    req = parse(parser, modified(body, lambda b: b.update(top_m=3, top_n=2, unit_id="u")))
    assert req.window == 3 and req.top_n == 2 and req.unit_id == "u"
    assert parse(parser, orjson.dumps(body), default_top_m=5).window == 5


def _set_candidate(i: int, key: str, value):
    def edit(b):
        b["candidates"][i][key] = value

    return edit


def _set_feature(i: int, group: str, value):
    def edit(b):
        b["candidates"][i]["features"][group] = value

    return edit


def _del_feature(i: int, group: str):
    def edit(b):
        del b["candidates"][i]["features"][group]

    return edit


# (name, edit, expected status, expected code, expected field prefix)
CASES = [
    ("wrong dimension", _set_feature(2, "visual", [0.0] * 7), 422, "invalid_request", "candidates[2].features.visual"),
    (
        "wrong query dimension",
        lambda b: b["query"]["features"].update(text_embedding=[0.0] * 3),
        422,
        "invalid_request",
        "query.features.text_embedding",
    ),
    (
        "base64 of the wrong length",
        _set_feature(0, "conflict", base64.b64encode(np.zeros(4, "<f4").tobytes()).decode()),
        422,
        "invalid_request",
        "candidates[0].features.conflict",
    ),
    (
        "not base64",
        _set_feature(0, "conflict", "not base64!"),
        422,
        "invalid_request",
        "candidates[0].features.conflict",
    ),
    (
        "beyond float32 range",
        _set_feature(1, "visual", [1e39] + [0.0] * 7),
        422,
        "invalid_request",
        "candidates[1].features.visual",
    ),
    (
        "unknown group in window",
        _set_feature(3, "bogus", [1.0]),
        422,
        "invalid_request",
        "candidates[3].features.bogus",
    ),
    (
        "missing group in window",
        _del_feature(TOP_M - 1, "visual"),
        422,
        "invalid_request",
        f"candidates[{TOP_M - 1}].features.visual",
    ),
    (
        "missing features in window",
        lambda b: b["candidates"][0].pop("features"),
        422,
        "invalid_request",
        "candidates[0].features",
    ),
    ("empty candidate list", lambda b: b.update(candidates=[]), 422, "invalid_request", "candidates"),
    (
        "duplicate ids",
        lambda b: b["candidates"][5].update(id=b["candidates"][4]["id"]),
        422,
        "invalid_request",
        "candidates[5].id",
    ),
    ("top_m zero", lambda b: b.update(top_m=0), 422, "invalid_request", "top_m"),
    ("top_m above the bundle's", lambda b: b.update(top_m=TOP_M + 1), 422, "invalid_request", "top_m"),
    ("top_n zero", lambda b: b.update(top_n=0), 422, "invalid_request", "top_n"),
    ("top_n above max_candidates", lambda b: b.update(top_n=MAX_CANDIDATES + 1), 422, "invalid_request", "top_n"),
    ("label in a request", _set_candidate(0, "label", 3.0), 422, "invalid_request", "candidates[0].label"),
    ("unknown field", lambda b: b.update(extra=1), 422, "invalid_request", "extra"),
    ("missing query", lambda b: b.pop("query"), 422, "invalid_request", "query"),
    ("id of the wrong type", _set_candidate(0, "id", 7), 422, "invalid_request", "candidates[0].id"),
    ("empty id", _set_candidate(0, "id", ""), 422, "invalid_request", "candidates[0].id"),
    (
        "too many candidates",
        lambda b: b.update(candidates=[{"id": f"x{i}", "upstream_score": 0.0} for i in range(MAX_CANDIDATES + 1)]),
        413,
        "too_many_candidates",
        "candidates",
    ),
]


@pytest.mark.parametrize("name,edit,status,code,field", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_map_to_4xx_with_a_field(parser, body, name, edit, status, code, field) -> None:
    raw = modified(body, edit)
    e = refused(parser, raw)
    assert (e.status, e.code) == (status, code), e
    assert e.field is not None and e.field.startswith(field), e
    assert e.body() == {"error": {"code": code, "message": e.message, "field": e.field}}
    # the orjson path never answers for a bad body: the reference raises, with exactly its error
    assert parser.parse_fast(raw, default_top_m=TOP_M) is None
    with pytest.raises(RequestError) as ref:
        parser.parse_validated(raw, default_top_m=TOP_M)
    assert ref.value.body() == e.body()


# ---------------------------------------------------------------------------- the orjson path vs the reference


def assert_same_request(a, b) -> None:
    """Two ParsedRequests are the same request: ids, options, and bit-identical float32 arrays."""
    assert (a.query_id, a.unit_id, a.ids, a.top_n, a.window) == (b.query_id, b.unit_id, b.ids, b.top_n, b.window)
    x, y = a.inputs, b.inputs
    assert (x.query_id, x.ids, x.window, x.labels, y.labels) == (y.query_id, y.ids, y.window, None, None)
    pairs = [(x.upstream, y.upstream)]
    assert x.features.keys() == y.features.keys() and x.query_features.keys() == y.query_features.keys()
    pairs += [(x.features[g], y.features[g]) for g in y.features]
    pairs += [(x.query_features[g], y.query_features[g]) for g in y.query_features]
    for u, v in pairs:
        assert u.dtype == v.dtype == np.float32 and u.shape == v.shape
        assert u.tobytes() == v.tobytes()  # bit for bit (-0.0 included)


@pytest.mark.parametrize("encoding", ["list", "base64"])
@pytest.mark.parametrize("options", [{}, {"top_m": 3, "top_n": 2, "unit_id": "u"}, {"unit_id": ""}])
def test_the_orjson_path_reads_valid_bodies_exactly_like_the_reference(parser, records, encoding, options) -> None:
    for record in records[:3]:
        raw = orjson.dumps(request_body(record, encoding=encoding, **options))
        fast = parser.parse_fast(raw, default_top_m=TOP_M)
        assert fast is not None  # valid bodies of the usual shapes take the fast path
        assert_same_request(fast, parser.parse_validated(raw, default_top_m=TOP_M))
        assert_same_request(parser.parse(raw, default_top_m=TOP_M), fast)


def _vector_edit(fn):
    def edit(b):
        fn(b["candidates"][1]["features"]["visual"], b)

    return edit


# Valid bodies, all accepted by the reference, in shapes the orjson path must get exactly right
# (`fast`: it answers) or leave to the reference (`declined`): the answer is the reference's either way.
VALID_VARIANTS = [
    ("integers in a vector", _vector_edit(lambda v, b: v.__setitem__(slice(0, 3), [0, 1, -2])), "fast"),
    ("integer upstream scores", lambda b: [c.update(upstream_score=i) for i, c in enumerate(b["candidates"])], "fast"),
    ("huge integer score", lambda b: b["candidates"][0].update(upstream_score=2**64 - 1), "fast"),
    ("zeros and ones", _vector_edit(lambda v, b: v.__setitem__(slice(None), [0.0, 1.0, 0, 1] * 2)), "fast"),
    ("negative zero", _vector_edit(lambda v, b: v.__setitem__(0, -0.0)), "fast"),
    ("float32 max", _vector_edit(lambda v, b: v.__setitem__(0, 3.4028234663852886e38)), "fast"),
    ("subnormals", _vector_edit(lambda v, b: v.__setitem__(0, 1e-45)), "fast"),
    ("empty query features for tail", lambda b: b["candidates"][-1].update(features={}), "fast"),
    ("tail features as lists", lambda b: b["candidates"][-1].update(features={"x": [1.0, 2]}), "fast"),
    ("tail features as base64", lambda b: b["candidates"][-1].update(features={"x": "AAAA"}), "fast"),
    ("null tail features", lambda b: b["candidates"][-1].update(features=None), "fast"),
    ("unicode ids", lambda b: b["candidates"][0].update(id="日本語🙂"), "fast"),
    ("null unit_id", lambda b: b.update(unit_id=None), "fast"),
    ("null top_m and top_n", lambda b: b.update(top_m=None, top_n=None), "fast"),
    ("null label", lambda b: b["candidates"][0].update(label=None), "declined"),
    ("float top_m", lambda b: b.update(top_m=3.0), "declined"),
    ("numeric string score", lambda b: b["candidates"][0].update(upstream_score="1.5"), "declined"),
    ("numeric string in a vector", _vector_edit(lambda v, b: v.__setitem__(0, "0.5")), "declined"),
    ("bool score", lambda b: b["candidates"][0].update(upstream_score=True), "declined"),
]


@pytest.mark.parametrize("name,edit,path", VALID_VARIANTS, ids=[v[0] for v in VALID_VARIANTS])
def test_valid_variants_answer_exactly_like_the_reference(parser, body, name, edit, path) -> None:
    raw = modified(body, edit)
    try:
        ref = parser.parse_validated(raw, default_top_m=TOP_M)
    except RequestError as e:  # the reference decides; the parser must say the same
        assert refused(parser, raw).body() == e.body()
        assert parser.parse_fast(raw, default_top_m=TOP_M) is None
        return
    fast = parser.parse_fast(raw, default_top_m=TOP_M)
    assert (fast is not None) == (path == "fast"), name
    if fast is not None:
        assert_same_request(fast, ref)
    assert_same_request(parser.parse(raw, default_top_m=TOP_M), ref)


# Values numpy or orjson would take quietly (a bool is 1.0 to numpy, a numeric string becomes a
# number, null becomes NaN) or that differ from a JSON number only in type: the orjson path declines
# them all, and the answer is the reference's, whatever it is (pydantic's lax float takes a bool in
# a vector as 1.0, and then so does the service; a null in a vector is a 422 naming it).
QUIET_TRAPS = [
    ("bool in a vector", _vector_edit(lambda v, b: v.__setitem__(0, True)), "candidates[1].features.visual"),
    ("false in a vector", _vector_edit(lambda v, b: v.__setitem__(2, False)), "candidates[1].features.visual"),
    ("null in a vector", _vector_edit(lambda v, b: v.__setitem__(2, None)), "candidates[1].features.visual"),
    ("nested list in a vector", _vector_edit(lambda v, b: v.__setitem__(2, [1.0])), "candidates[1].features.visual"),
    ("object in a vector", _vector_edit(lambda v, b: v.__setitem__(2, {})), "candidates[1].features.visual"),
    ("word in a vector", _vector_edit(lambda v, b: v.__setitem__(0, "x")), "candidates[1].features.visual"),
    ("bool in the query vector", lambda b: b["query"]["features"]["text_embedding"].__setitem__(5, True), "query"),
    ("bool in a tail vector", lambda b: b["candidates"][-1].update(features={"x": [1.0, True]}), "candidates"),
    ("null in a tail vector", lambda b: b["candidates"][-1].update(features={"x": [1.0, None]}), "candidates"),
    ("null score", lambda b: b["candidates"][3].update(upstream_score=None), "candidates[3].upstream_score"),
    ("list as query id", lambda b: b["query"].update(id=["q"]), "query.id"),
    ("long unit_id", lambda b: b.update(unit_id="u" * 257), "unit_id"),
    ("long candidate id", lambda b: b["candidates"][2].update(id="c" * 257), "candidates[2].id"),
    ("bool top_n", lambda b: b.update(top_n=True), "top_n"),
    ("a vector as a number", _vector_edit(lambda v, b: b["candidates"][1]["features"].update(visual=3.0)), "cand"),
    ("null query features", lambda b: b["query"].update(features=None), "query.features"),
    ("unknown query key", lambda b: b["query"].update(x=1), "query.x"),
    ("candidate not an object", lambda b: b["candidates"].__setitem__(4, "c4"), "candidates[4]"),
]


@pytest.mark.parametrize("name,edit,field", QUIET_TRAPS, ids=[t[0] for t in QUIET_TRAPS])
def test_values_numpy_would_take_quietly_get_the_reference_answer(parser, body, name, edit, field) -> None:
    raw = modified(body, edit)
    assert parser.parse_fast(raw, default_top_m=TOP_M) is None, name
    try:
        ref = parser.parse_validated(raw, default_top_m=TOP_M)
    except RequestError as e:
        got = refused(parser, raw)
        assert got.body() == e.body() and got.status == 422
        assert got.field is not None and got.field.startswith(field), got
        return
    assert_same_request(parser.parse(raw, default_top_m=TOP_M), ref)


def test_the_reference_outcomes_of_the_traps_are_pinned(parser, body) -> None:
    # what the contract is today, so a change of pydantic's lax rules shows here first
    accepted = {name for name, edit, _ in QUIET_TRAPS if not _refused_by_reference(parser, modified(body, edit))}
    bools = {"bool in a vector", "false in a vector", "bool in the query vector", "bool in a tail vector", "bool top_n"}
    assert accepted == bools


def _refused_by_reference(parser, raw: bytes) -> bool:
    try:
        parser.parse_validated(raw, default_top_m=TOP_M)
    except RequestError:
        return True
    return False


def test_duplicate_keys_and_whitespace_read_the_same_both_ways(parser, body) -> None:
    raw = orjson.dumps(body)
    dup = b'{"top_n":1,' + raw[1:]
    spaced = orjson.dumps(body, option=orjson.OPT_INDENT_2)
    twice = raw[:-1] + b',"top_n":3,"top_n":2}'  # the last of duplicate keys wins, for pydantic and orjson
    for variant in (dup, spaced, twice):
        fast = parser.parse_fast(variant, default_top_m=TOP_M)
        assert fast is not None
        assert_same_request(fast, parser.parse_validated(variant, default_top_m=TOP_M))
    assert parser.parse(twice, default_top_m=TOP_M).top_n == 2


@pytest.mark.parametrize(
    "token,where",
    [
        (b"NaN", "upstream_score"),
        (b"Infinity", "upstream_score"),
        (b"-Infinity", "upstream_score"),
    ],
)
def test_nan_and_infinity_json_tokens_are_422_not_500(parser, body, token, where) -> None:
    raw = orjson.dumps(body).replace(
        b'"upstream_score":' + orjson.dumps(body["candidates"][0]["upstream_score"]), b'"upstream_score":' + token, 1
    )
    e = refused(parser, raw)
    assert e.status == 422 and e.field == f"candidates[0].{where}"


def test_nan_inside_an_embedding_list_is_422(parser, body) -> None:
    raw = orjson.dumps(modified_visual(body)).replace(b"123456.0", b"NaN", 1)
    e = refused(parser, raw)
    assert e.status == 422 and e.field.startswith("candidates[0].features.visual"), e


def modified_visual(body: dict) -> dict:
    b = orjson.loads(orjson.dumps(body))
    b["candidates"][0]["features"]["visual"][3] = 123456.0
    return b


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"[1, 2]", b'"x"'])
def test_non_json_or_non_object_bodies_are_422(parser, raw) -> None:
    e = refused(parser, raw)
    assert e.status == 422 and e.code in ("invalid_json", "invalid_request")


class _FakeRequest:
    def __init__(self, body: bytes, chunk: int = 1000, declare: bool = True):
        self.headers = {"content-length": str(len(body))} if declare else {}
        self._chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
        self.consumed = 0

    async def stream(self):
        for c in self._chunks:
            self.consumed += len(c)
            yield c


def test_body_limit_checked_from_content_length_before_reading() -> None:
    req = _FakeRequest(b"x" * 5000)
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(req, limit=4096))
    assert info.value.status == 413 and info.value.code == "body_too_large" and req.consumed == 0


def test_body_limit_enforced_while_streaming_without_content_length() -> None:
    req = _FakeRequest(b"x" * 50_000, declare=False)
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(req, limit=4096))
    assert info.value.status == 413 and req.consumed <= 4096 + 1000


def test_body_within_limit_is_returned_whole() -> None:
    assert asyncio.run(read_body(_FakeRequest(b"abc" * 100, chunk=7), limit=4096)) == b"abc" * 100


def test_bad_content_length_is_422() -> None:
    req = _FakeRequest(b"{}")
    req.headers = {"content-length": "lots"}
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(req, limit=4096))
    assert info.value.status == 422


def test_error_table_and_pydantic_paths() -> None:
    assert STATUS["invalid_request"] == 422 and STATUS["too_many_candidates"] == 413 and STATUS["not_ready"] == 503
    with pytest.raises(ValueError):
        RequestError("no_such_code", "x")
    with pytest.raises(ValidationError) as info:
        RerankRequest.model_validate(
            {"query": {"id": "q", "features": {"t": 5}}, "candidates": [{"id": "a", "upstream_score": 1}]}
        )
    e = from_validation_error(info.value)
    assert e.field == "query.features.t" and e.status == 422


def test_openapi_documents_the_request_body() -> None:
    app = FastAPI(title="t", version="0")

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict:  # pragma: no cover - never called
        return {}

    install_openapi(app)
    schema = app.openapi()
    ref = schema["paths"]["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/RerankRequest"
    assert {"RerankRequest", "QueryIn", "CandidateRecord"} <= set(schema["components"]["schemas"])
