"""Fuzzing the HTTP API of a real server (the tiny bundle, 127.0.0.1): whatever a client sends,
the answer is a 2xx or a 4xx in OpenAI's error shape, never a 5xx, and always in time.

Two generators: hypothesis over JSON bodies built from the endpoints' field names (so that
validation is reached, not only the JSON parser), and schemathesis over the server's own
OpenAPI schema, positive (schema-valid) and negative (schema-breaking) cases for every route.
Generation is cheap on purpose: valid requests ask for a few tokens at most.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from test_server import serving

from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.http.server import create_app

MAX_QUEUED = 64
ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/embeddings")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def app(tiny_bundle):
    ae = AsyncEngine.from_bundle(tiny_bundle[0])
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield create_app(ae, model_name="tiny", max_queued=MAX_QUEUED, max_request_bytes=1 << 20)
    ae.shutdown()


@pytest.fixture(scope="module")
def url(app) -> Iterator[str]:
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def post(http: httpx.Client, route: str, body: object) -> httpx.Response:
    """JSON with ASCII escapes, as most clients send it (so lone surrogates travel as \\ud800)."""
    headers = {"Content-Type": "application/json"}
    return http.post(route, content=json.dumps(body).encode(), headers=headers)


def assert_answered(r: httpx.Response) -> None:
    """2xx, or a 4xx in OpenAI's shape: never a server error."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "tiny", "user", "assistant", "system", "text", "\x00", "€"]),
)
FIELDS = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "seed",
        "stop",
        "stop_token_ids",
        "stream",
        "stream_options",
        "include_usage",
        "logprobs",
        "top_logprobs",
        "echo",
        "best_of",
        "suffix",
        "logit_bias",
        "ignore_eos",
        "tokens",
        "input",
        "add_generation_prompt",
        "add_special_tokens",
        "return_token_strs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "encoding_format",
        "dimensions",
        "truncate_prompt_tokens",
    ]
) | st.text(max_size=6)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(FIELDS, inner, max_size=5),
    max_leaves=30,
)


def _cheap(body: object) -> object:
    """Bound what a valid request costs: a few tokens and choices (fuzzing validation, not the
    model)."""
    if isinstance(body, dict):
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
            body["max_tokens"] = 4
        for key, most in (("max_completion_tokens", 4), ("n", 2)):
            if isinstance(body.get(key), int) and body[key] > most:
                body[key] = most
    return body


VALID = {
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hello"},
    "/detokenize": {"tokens": [5, 6]},
    "/v1/embeddings": {"input": "hi"},
}


@st.composite
def routes_and_bodies(draw) -> tuple[str, object]:
    """Anything JSON, an object of known field names, or a valid body with a few fields
    replaced (which reaches the checks behind validation)."""
    route = draw(st.sampled_from(ROUTES))
    kind = draw(st.sampled_from(["any", "fields", "mutated"]))
    if kind == "any":
        body = draw(json_value)
    elif kind == "fields":
        body = draw(st.dictionaries(FIELDS, json_value, max_size=8))
    else:
        body = {**VALID[route], **draw(st.dictionaries(FIELDS, json_value, min_size=1, max_size=3))}
    return route, _cheap(body)


@given(case=routes_and_bodies())
@FUZZ
@example(case=("/v1/completions", {"model": "\ud800", "prompt": "hi"}))
@example(case=("/v1/completions", {"prompt": "\ud800 hi", "max_tokens": 2}))
@example(case=("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]}))
@example(case=("/tokenize", {"prompt": "\ud800"}))
@example(case=("/v1/completions", {"prompt": [[1, 2]] * (MAX_QUEUED + 1), "max_tokens": 1}))
@example(case=("/v1/completions", {"prompt": "hi", "stop": ["x"] * 5000, "max_tokens": 1}))
@example(case=("/v1/completions", {"prompt": "hi", "stop": ["x" * 5000], "max_tokens": 1}))
@example(case=("/detokenize", {"tokens": [2**70]}))
def test_random_bodies_are_never_a_server_error(http, case):
    route, body = case
    assert_answered(post(http, route, body))


@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
@FUZZ
@example(raw=b"[" * 100_000)
@example(raw=b'{"prompt": "a", "max_tokens": 1e999}')
@example(raw=b'{"prompt": "a", "temperature": NaN}')
@example(raw=b"\xff\xfe{}")
def test_random_bytes_are_never_a_server_error(http, raw):
    for route in ROUTES[:3]:
        assert_answered(http.post(route, content=raw, headers={"Content-Type": "application/json"}))


def test_surrogates_and_batches_are_client_errors(http):
    """Regressions found by the fuzzers, with the answers they must get."""
    r = post(http, "/v1/completions", {"model": "\ud800", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(http, "/v1/completions", {"prompt": "a\ud800b", "max_tokens": 1})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    r = post(http, "/v1/completions", {"prompt": [[5]] * (MAX_QUEUED + 1), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # 503 would mislead
    r = post(http, "/v1/completions", {"prompt": "hi", "stop": ["ab"] * 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = http.post(
        "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not")


def test_oversized_bodies_are_413_before_parsing(http, url):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies as the body streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    port = int(url.rsplit(":", 1)[1])  # a Content-Length too long for an int is not a crash
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000)
        s.sendall(b"\r\n\r\n")
        assert not s.recv(64).startswith(b"HTTP/1.1 5")


@pytest.fixture(scope="module")
def openapi(app) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_dict(app.openapi())


def _check(case, url: str) -> None:
    if isinstance(case.body, dict):
        _cheap(case.body)
    response = case.call(base_url=url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        assert set(json.loads(response.text)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_schema_fuzz_finds_no_server_error(openapi, url, mode):
    @given(case=openapi.as_strategy(generation_mode=mode))
    @FUZZ
    def fuzz(case):
        _check(case, url)

    fuzz()


@pytest.fixture(scope="module")
def embed_http(minilm_bundle) -> Iterator[httpx.Client]:
    from aotlm.runtime.embedding.async_embedder import AsyncEmbedder

    ae = AsyncEmbedder.from_bundle(minilm_bundle[0], max_wait_s=0.002)
    assert ae.wait_loaded(120), ae.unavailable_reason()
    app = create_app(ae, model_name="minilm", max_queued=MAX_QUEUED, max_request_bytes=1 << 20)
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client
    ae.shutdown()


EMBED_FIELDS = st.sampled_from(
    ["model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"]
)


@given(
    body=st.dictionaries(EMBED_FIELDS, json_value, max_size=5)
    | st.builds(
        lambda extra: {"input": "hello", **extra}, st.dictionaries(EMBED_FIELDS, json_value)
    )
    | json_value
)
@FUZZ
@example(body={"input": "\ud800"})
@example(body={"input": ["ok", "\udfff"]})
@example(body={"input": [[101, 2**40, 102]]})
@example(body={"input": "word " * 500, "truncate_prompt_tokens": -1})
@example(body={"input": [[]]})
def test_random_embedding_bodies_are_never_a_server_error(embed_http, body):
    for route in ("/v1/embeddings", "/tokenize", "/v1/completions"):
        assert_answered(post(embed_http, route, body))
