"""Property-based fuzzing of the rerank request contract: `RequestParser` (Ray-free) and the HTTP API.

Hostile inputs: malformed and truncated JSON, random bytes, NaN/Infinity tokens, huge integers and
floats (beyond float64 and float32), unicode and lone-surrogate ids, invalid UTF-8, deep nesting,
wrong types at every site, empty and oversized candidate lists, wrong dimensions, base64 garbage,
unknown keys, oversized bodies.

Properties
- parser: every body either parses into finite float32 arrays of the spec's shapes, or raises
  `RequestError` (413/422, a known code, the error-body shape); never another exception.
- HTTP (differential): every response is what the library parser says for the same bytes (200, or
  the same status / code / field), plus the body-size limit; never a 5xx; every 4xx carries
  ``{"error": {"code", "message", "field"}}``; a 200 is a well-formed ranking of exactly the request's
  candidates (upstream order whenever `fallback` is set); the app is healthy afterwards.

Sizes: the suite sends >= 500 generated HTTP requests and runs >= 1,500 parser examples;
``COTRR_FULL_RELIABILITY=1`` multiplies both (>= 2,000 HTTP, >= 10,000 parser examples).
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import os
import time
from typing import Any

import numpy as np
import orjson
import pytest
from _bundles import TOP_M, request_body
from factories import TINY_SPEC, tiny_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC
from cotrr_ray.serving.api import ParsedRequest, RequestParser
from cotrr_ray.serving.errors import STATUS, RequestError

FULL = os.environ.get("COTRR_FULL_RELIABILITY") == "1"
PARSER_EXAMPLES = 10_000 if FULL else 1_500  # across the parser properties below (Ray-free, cheap)
HTTP_EXAMPLES = 2_000 if FULL else 500  # generated HTTP requests in total
MAX_CANDIDATES = 64  # small, so oversized lists are cheap to generate
MAX_BODY = 256 * 1024  # fits every base body (list-encoded ~180 KB); bigger ones are a 413

FUZZ = settings(
    deadline=None,
    database=None,  # reproducible in CI: no example database carried between runs
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ============================================================================ strategies

BIG_INTS = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, -(10**400)])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e39, -1e39, 3.4e38, 1e30, 1e-45, 5e-324, -0.0, 1.7976931348623157e308]
)
UNICODE = st.text(max_size=40) | st.sampled_from(
    ["", " ", "\x00", "é", "日本語", "🙂" * 10, "\u202e", "\ufeff", "a" * 257, "x" * 5000, "\\", '"', "NaN"]
)
B64_GARBAGE = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | st.sampled_from(
    ["", "====", "AAAA=", "not base64!", "AAA", base64.b64encode(b"\x00" * 33).decode(), "A" * 4001]
)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | BIG_INTS | FLOATS | UNICODE | B64_GARBAGE


def _nested(depth: int) -> Any:
    out: Any = 0
    for _ in range(depth):
        out = [out]
    return out


HOSTILE = st.one_of(
    SCALARS,
    st.lists(FLOATS, max_size=20),
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=0, max_size=600),  # wrong dims, mostly
    st.integers(1, 600).map(lambda d: [0.5] * d),
    st.integers(1, 300).map(_nested),  # deep nesting (beyond the JSON parser's recursion limit too)
    st.dictionaries(UNICODE, SCALARS, max_size=4),
    st.lists(st.dictionaries(UNICODE, SCALARS, max_size=3), max_size=3),
    st.builds(dict),  # fresh objects: a mutation must never change the strategy (st.just({}) would)
    st.builds(list),
)


def _is_vector(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, int | float) for x in v)


def sites(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every value of a body, without descending into number vectors (their element is
    addressed by a trailing '*', filled in by the mutation)."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += sites(v, path + (k,))
    elif isinstance(node, list):
        if _is_vector(node):
            out.append(path + ("*",))
        else:
            for i, v in enumerate(node):
                out += sites(v, path + (i,))
    return out


def _get(body: Any, path: tuple) -> Any:
    for p in path:
        body = body[p]
    return body


@st.composite
def mutated_body(draw, bases: list[dict]) -> bytes:
    """A valid body with 1-3 sites replaced by hostile values, deleted, or given unknown keys."""
    body = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sites(body)))
        if path and path[-1] == "*":
            vec = _get(body, path[:-1])
            path = path[:-1] + (draw(st.integers(0, len(vec) - 1)),)
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add_key"]))
        if not path:  # the body itself
            body = draw(HOSTILE) if action == "replace" else body
            if not isinstance(body, dict | list):
                break
            continue
        parent = _get(body, path[:-1])
        if not isinstance(parent, dict | list):
            continue
        if action == "delete":
            del parent[path[-1]]
        elif action == "add_key" and isinstance(_get(body, path), dict):
            _get(body, path)[draw(UNICODE)] = draw(SCALARS)
        else:
            parent[path[-1]] = draw(HOSTILE)
    for key in ("top_m", "top_n", "unit_id"):
        if isinstance(body, dict) and draw(st.integers(0, 9)) == 0:
            body[key] = draw(HOSTILE | st.integers(-3, 80))
    ensure_ascii = draw(st.booleans())
    text = json.dumps(body, allow_nan=True, ensure_ascii=ensure_ascii)  # NaN/Infinity tokens, big ints
    return text.encode("utf-8", "surrogatepass")  # lone surrogates -> invalid UTF-8 bytes


@st.composite
def raw_body(draw, bases: list[dict]) -> bytes:
    """Malformed bytes: truncations, byte flips, token splices, deep nesting, random bytes."""
    base = orjson.dumps(draw(st.sampled_from(bases)))
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "deep", "random", "wrap", "dupkey", "ws"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "splice":
        tokens = [
            b"NaN",
            b"Infinity",
            b"-Infinity",
            b"1e400",
            b"-1e400",
            b"1" * 5000,
            b"nul",
            b"\xff",
            b"\x00",
            b"'x'",
            b"{}",
            b"[]",
            b",",
            b'"\\ud800"',
            b'"\\u0000"',
            b"true",
            b"0x10",
            b"+1",
            b".5",
        ]
        at = draw(st.integers(0, len(base)))
        end = draw(st.integers(at, min(len(base), at + 20)))
        return base[:at] + draw(st.sampled_from(tokens)) + base[end:]
    if kind == "deep":
        d = draw(st.integers(1, 100_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * d + b"0" + closer * draw(st.integers(0, d))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    if kind == "wrap":
        return b"[" + base + b"]"
    if kind == "dupkey":
        return b'{"candidates":[],' + base[1:]
    return draw(st.sampled_from([b"", b" ", b"\n\t ", b"\xef\xbb\xbf" + base, base + b"garbage", base + base]))


@st.composite
def structured_body(draw, query_features: dict, cand_features: dict, top_m: int = TOP_M) -> bytes:
    """Well-formed JSON of many list shapes: 0..MAX_CANDIDATES+8 candidates, features present or
    not, unicode ids (duplicates possible), extreme upstream scores, random top_m/top_n."""
    benign = draw(st.booleans())  # half the lists are valid, with unusual but legal values
    if benign:
        n = draw(st.integers(1, MAX_CANDIDATES) | st.sampled_from([1, MAX_CANDIDATES, MAX_CANDIDATES + 1]))
        with_features = top_m
        ids = draw(st.lists(st.text(min_size=1, max_size=64), min_size=n, max_size=n, unique=True))
        finite32 = st.floats(-3e38, 3e38, allow_subnormal=True) | st.integers(-(2**63), 2**63 - 1)
        scores = draw(st.lists(st.floats(-1e6, 1e6) | finite32, min_size=n, max_size=n))
    else:
        n = draw(st.integers(0, MAX_CANDIDATES + 8) | st.sampled_from([0, 1, MAX_CANDIDATES, MAX_CANDIDATES + 1]))
        with_features = draw(st.integers(0, top_m + 1))
        ids = draw(st.lists(UNICODE, min_size=n, max_size=n) | st.just([f"c{i}" for i in range(n)]))
        scores = draw(st.lists(st.floats(-1e6, 1e6) | FLOATS | BIG_INTS, min_size=n, max_size=n))
    cands = []
    for i in range(n):
        c: dict[str, Any] = {"id": ids[i], "upstream_score": scores[i]}
        if i < with_features:
            c["features"] = cand_features
        cands.append(c)
    qid = draw(st.text(min_size=1, max_size=256) if benign else UNICODE)
    body: dict[str, Any] = {"query": {"id": qid, "features": query_features}, "candidates": cands}
    if draw(st.booleans()):
        body["top_m"] = draw(st.integers(1, top_m) if benign else st.integers(-2, top_m + 2) | BIG_INTS)
    if draw(st.booleans()):
        body["top_n"] = draw(
            st.integers(1, MAX_CANDIDATES) if benign else st.integers(-2, MAX_CANDIDATES + 2) | BIG_INTS
        )
    if draw(st.booleans()):
        body["unit_id"] = draw(st.text(max_size=256) | st.none() if benign else UNICODE | st.none())
    return json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


# ============================================================================ the parser (Ray-free)


PARSE_OUTCOMES: collections.Counter = collections.Counter()  # printed at the end (pytest -s)


def _same_request(a: ParsedRequest, b: ParsedRequest) -> bool:
    x, y = a.inputs, b.inputs
    arrays = [(x.upstream, y.upstream)]
    arrays += [(x.features.get(g), y.features[g]) for g in y.features]
    arrays += [(x.query_features.get(g), y.query_features[g]) for g in y.query_features]
    return (
        (a.query_id, a.unit_id, a.ids, a.top_n, a.window) == (b.query_id, b.unit_id, b.ids, b.top_n, b.window)
        and (x.query_id, x.ids, x.window, x.labels) == (y.query_id, y.ids, y.window, None)
        and x.features.keys() == y.features.keys()
        and x.query_features.keys() == y.query_features.keys()
        and all(u is not None and u.dtype == v.dtype and u.tobytes() == v.tobytes() for u, v in arrays)
    )


def check_paths_agree(parser: RequestParser, raw: bytes, default_top_m: int) -> None:
    """The orjson path answers only for bodies the reference accepts, with bit-identical arrays."""
    fast = parser.parse_fast(raw, default_top_m=default_top_m)
    if fast is None:
        PARSE_OUTCOMES["fast:declined"] += 1
        return
    PARSE_OUTCOMES["fast:answered"] += 1
    try:
        ref = parser.parse_validated(raw, default_top_m=default_top_m)
    except RequestError as e:
        raise AssertionError(f"the orjson path accepted a body the reference refuses: {e!r} {raw[:300]!r}") from None
    assert _same_request(fast, ref), raw[:300]


def check_parse(parser: RequestParser, raw: bytes, default_top_m: int) -> ParsedRequest | RequestError:
    """Parse `raw`; assert the parser's contract (and that its two paths agree); return what it gave."""
    check_paths_agree(parser, raw, default_top_m)
    try:
        req = parser.parse(raw, default_top_m=default_top_m)
    except RequestError as e:
        PARSE_OUTCOMES[e.code] += 1
        assert e.code in STATUS and e.status in (413, 422), e
        assert isinstance(e.message, str) and e.message
        assert e.field is None or isinstance(e.field, str)
        assert set(e.body()["error"]) == {"code", "message", "field"}
        return e
    # Anything else escaping is a bug (it would be a 500 in the router).
    PARSE_OUTCOMES["ok"] += 1
    n = len(req.ids)
    assert 1 <= n <= parser.max_candidates and len(set(req.ids)) == n
    assert 1 <= req.window <= min(n, parser.max_top_m)
    cl = req.inputs
    assert cl.ids == req.ids[: req.window] and cl.upstream.shape == (req.window,)
    assert cl.upstream.dtype == np.float32
    for g, d in parser.spec.candidate.items():
        assert cl.features[g].shape == (req.window, d) and cl.features[g].dtype == np.float32
        assert np.isfinite(cl.features[g]).all()
    for g, d in parser.spec.query.items():
        assert cl.query_features[g].shape == (d,) and np.isfinite(cl.query_features[g]).all()
    assert np.isfinite(cl.upstream).all()  # upstream scores beyond float32 are a 422, not an inf
    return req


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    print(f"\nparser outcomes over all fuzz checks (parser + HTTP oracle): {dict(PARSE_OUTCOMES)}")


@pytest.fixture(scope="module")
def tiny_parser() -> RequestParser:
    return RequestParser(TINY_SPEC, max_top_m=3, max_candidates=MAX_CANDIDATES)


@pytest.fixture(scope="module")
def image_parser() -> RequestParser:
    return RequestParser(IMAGE_SEARCH_SPEC, max_top_m=TOP_M, max_candidates=MAX_CANDIDATES)


def _tiny_request(n: int, seed: int) -> dict:
    rec = tiny_record(n, labels=False, seed=seed)
    return {"query": {"id": rec["id"], "features": rec["features"]}, "candidates": rec["candidates"]}


TINY_BASES = [_tiny_request(n, seed) for n, seed in ((1, 0), (3, 1), (5, 2))]
TINY_BASES.append({**_tiny_request(4, 3), "top_m": 2, "top_n": 3, "unit_id": "u-1"})


@pytest.fixture(scope="module")
def image_bases(records) -> list[dict]:
    return [request_body(records[0], encoding="base64"), request_body(records[1], encoding="list", top_m=3, top_n=4)]


@settings(FUZZ, max_examples=PARSER_EXAMPLES * 4 // 10)
@given(data=st.data())
def test_parser_mutated_tiny_bodies(tiny_parser, data) -> None:
    check_parse(tiny_parser, data.draw(mutated_body(TINY_BASES)), default_top_m=3)


@settings(FUZZ, max_examples=PARSER_EXAMPLES * 2 // 10)
@given(data=st.data())
def test_parser_raw_bytes(tiny_parser, data) -> None:
    check_parse(tiny_parser, data.draw(raw_body(TINY_BASES)), default_top_m=3)


@settings(FUZZ, max_examples=PARSER_EXAMPLES * 2 // 10)
@given(data=st.data())
def test_parser_structured_lists(tiny_parser, data) -> None:
    q = {"q": [0.25, -0.5]}
    c = {"a": [0.1, 0.2, 0.3], "b": [1.0, -1.0]}
    check_parse(tiny_parser, data.draw(structured_body(q, c, top_m=3)), default_top_m=3)


@settings(FUZZ, max_examples=PARSER_EXAMPLES * 2 // 10)
@given(data=st.data())
def test_parser_mutated_image_search_bodies(image_parser, image_bases, data) -> None:
    check_parse(image_parser, data.draw(mutated_body(image_bases)), default_top_m=TOP_M)


def test_parser_accepts_the_unmutated_bases(tiny_parser, image_parser, image_bases) -> None:
    for b in TINY_BASES:
        assert isinstance(check_parse(tiny_parser, orjson.dumps(b), 3), ParsedRequest)
        assert tiny_parser.parse_fast(orjson.dumps(b), default_top_m=3) is not None  # the fast path is exercised
    for b in image_bases:
        assert isinstance(check_parse(image_parser, orjson.dumps(b), TOP_M), ParsedRequest)
        assert image_parser.parse_fast(orjson.dumps(b), default_top_m=TOP_M) is not None


@settings(FUZZ, max_examples=PARSER_EXAMPLES * 2 // 10)
@given(
    vec=st.lists(
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**64), 2**64) | st.booleans(),
        min_size=3,
        max_size=3,
    ),
    score=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**64), 2**64),
)
def test_parser_paths_agree_on_every_number(tiny_parser, vec, score) -> None:
    # numbers at the edges: float32 overflow, subnormals, -0.0, integers past 2**53 and 2**63, bools
    body = _tiny_request(3, 0)
    body["candidates"][0]["features"]["a"] = vec
    body["candidates"][1]["upstream_score"] = score
    check_parse(tiny_parser, json.dumps(body).encode(), default_top_m=3)


# ---------------------------------------------------------------------------- found by fuzzing


def test_upstream_score_beyond_float32_is_a_422(tiny_parser) -> None:
    body = _tiny_request(3, 0)
    body["candidates"][1]["upstream_score"] = 1e39
    e = check_parse(tiny_parser, orjson.dumps(body), 3)
    assert isinstance(e, RequestError) and e.field == "candidates[1].upstream_score"


# ============================================================================ the HTTP API


class HttpStats:
    def __init__(self) -> None:
        self.sent = 0
        self.status: collections.Counter = collections.Counter()
        self.codes: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_app(serve_session, bundle_a):
    import httpx
    from ray import serve

    from cotrr_ray.bundles.bundle import read_meta
    from cotrr_ray.config import AppArgs, RoutingConfig
    from cotrr_ray.serving.app import build_app

    args = AppArgs(
        bundle_uri=str(bundle_a),
        max_candidates=MAX_CANDIDATES,
        max_body_bytes=MAX_BODY,
        routing=RoutingConfig(rollout_percentage=100, experiment_salt="fuzz"),
    )
    serve.run(build_app(args), name="fuzz", route_prefix="/fuzz")
    meta = read_meta(bundle_a)
    parser = RequestParser(meta.spec, max_top_m=meta.top_m, max_candidates=MAX_CANDIDATES)
    stats = HttpStats()
    with httpx.Client(base_url=serve_session.http_url + "/fuzz", timeout=30) as client:
        yield client, parser, stats
    print(
        f"\nHTTP fuzz: {stats.sent} requests, status {dict(stats.status)}, codes {dict(stats.codes)}, "
        f"fallbacks {dict(stats.fallbacks)}"
    )
    serve.delete("fuzz")


def check_http(app, raw: bytes) -> None:
    """POST `raw`; the response must be exactly what the library parser (and the size limit) say."""
    client, parser, stats = app
    r = client.post("/v1/rerank", content=raw, headers={"content-type": "application/json"})
    stats.sent += 1
    stats.status[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500], raw[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    out = r.json()
    if len(raw) > MAX_BODY:
        expected: ParsedRequest | RequestError = RequestError("body_too_large", "-")
    else:
        expected = check_parse(parser, raw, TOP_M)
    if isinstance(expected, RequestError):
        assert set(out) == {"error"} and set(out["error"]) == {"code", "message", "field"}, out
        err = out["error"]
        stats.codes[err["code"]] += 1
        assert (r.status_code, err["code"]) == (expected.status, expected.code), (out, raw[:300])
        if expected.code != "body_too_large":
            assert err["field"] == expected.field and err["message"] == expected.message
        return
    assert r.status_code == 200, (r.status_code, out)
    assert set(out) == {"request_id", "model_version", "arm", "shadow", "fallback", "calibrated", "results"}
    stats.fallbacks[out["fallback"]] += 1
    ids, res = expected.ids, out["results"]
    k = len(ids) if expected.top_n is None else min(expected.top_n, len(ids))
    assert len(res) == k and [x["rank"] for x in res] == list(range(k))
    assert sorted(x["index"] for x in res) == sorted({x["index"] for x in res}) and all(
        ids[x["index"]] == x["id"] for x in res
    )
    if out["fallback"] is not None:  # upstream order, nothing scored
        assert [x["index"] for x in res] == list(range(k)) and not any(x["reranked"] for x in res)
    else:
        assert out["arm"] == "treatment" and all(x["reranked"] == (x["index"] < expected.window) for x in res)


@pytest.mark.integration
@settings(FUZZ, max_examples=HTTP_EXAMPLES * 5 // 10)
@given(data=st.data())
def test_http_mutated_bodies(fuzz_app, image_bases, data) -> None:
    check_http(fuzz_app, data.draw(mutated_body(image_bases)))


@pytest.mark.integration
@settings(FUZZ, max_examples=HTTP_EXAMPLES * 25 // 100)
@given(data=st.data())
def test_http_raw_bytes(fuzz_app, image_bases, data) -> None:
    check_http(fuzz_app, data.draw(raw_body(image_bases)))


@pytest.mark.integration
@settings(FUZZ, max_examples=HTTP_EXAMPLES * 25 // 100)
@given(data=st.data())
def test_http_structured_lists(fuzz_app, image_bases, data) -> None:
    base = image_bases[0]
    check_http(fuzz_app, data.draw(structured_body(base["query"]["features"], base["candidates"][0]["features"])))


HOSTILE_CASES = [
    b"",
    b"null",
    b"{}",
    b"[]",
    b"\xff\xfe\xfd",
    b"[" * 200_000,
    b'{"query":' * 5000,
    b"x" * (MAX_BODY + 1),  # oversized, not JSON
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":1e400}]}',
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":NaN}]}',
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":-Infinity}]}',
    b'{"query":{"id":"\\ud800"},"candidates":[{"id":"a","upstream_score":1}]}',
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":' + b"9" * 5000 + b"}]}",
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":1}],"top_n":' + b"9" * 300 + b"}",
    b'{"query":{"id":"q"},"candidates":[{"id":"a","upstream_score":1}],"bundle_uri":"/etc"}',
]


@pytest.mark.integration
def test_http_hand_picked_hostile_bodies_and_methods(fuzz_app, image_bases) -> None:
    for raw in HOSTILE_CASES:
        check_http(fuzz_app, raw)
    too_many = {
        **image_bases[0],
        "candidates": [{"id": f"c{i}", "upstream_score": 0} for i in range(MAX_CANDIDATES + 1)],
    }
    check_http(fuzz_app, orjson.dumps(too_many))
    big = copy.deepcopy(image_bases[0])
    big["query"]["id"] = "q" * (MAX_BODY + 10)  # oversized valid-looking JSON
    check_http(fuzz_app, orjson.dumps(big))
    client, _, stats = fuzz_app
    for method, path in (
        ("GET", "/v1/rerank"),
        ("PUT", "/v1/rerank"),
        ("DELETE", "/v1/model"),
        ("GET", "/v1/nope"),
        ("POST", "/healthz"),
        ("GET", "/v1/rerank/../../etc/passwd"),
    ):
        r = client.request(method, path)
        stats.sent += 1
        assert r.status_code in (404, 405), (method, path, r.status_code)
        assert set(r.json()["error"]) == {"code", "message", "field"}


@pytest.mark.integration
def test_http_fuzz_volume_and_health_afterwards(fuzz_app) -> None:
    client, _, stats = fuzz_app
    if stats.sent == 0:
        pytest.skip("run with the fuzz tests above (they send the requests)")
    assert stats.sent >= HTTP_EXAMPLES, stats.sent
    assert not any(s >= 500 for s in stats.status)
    deadline = time.monotonic() + 30
    while (health := client.get("/healthz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
