"""POST /v1/embeddings on an encoder bundle (the real all-MiniLM-L6-v2), driven by the official
`openai` client against uvicorn on 127.0.0.1, in this process and as `aotlm serve`."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import wait_ready
from test_async_engine import FakeEngine
from test_embedder import LONG, SENTENCES
from test_server import metric, serving

from aotlm.runtime.embedding.async_embedder import AsyncEmbedder
from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.http.server import create_app

MODEL = "minilm"


@pytest.fixture(scope="module")
def embedder(minilm_bundle):
    # A 20 ms collecting window makes the batching of concurrent requests observable.
    ae = AsyncEmbedder.from_bundle(minilm_bundle[0], strict=True, max_wait_s=0.02)
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def base_url(embedder):
    with serving(create_app(embedder, model_name=MODEL)) as url:
        yield url


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return client_for(base_url)


def vectors(response) -> np.ndarray:
    """The client decodes base64 itself only when it chose it (no encoding_format given)."""
    return np.array(
        [
            np.frombuffer(base64.b64decode(d.embedding), "<f4")
            if isinstance(d.embedding, str)
            else d.embedding
            for d in response.data
        ],
        dtype=np.float32,
    )


def check_embeddings(client: openai.OpenAI, base_url: str) -> None:
    """A string, a list, float and base64 (the client's default), token ids; usage counts."""
    one = client.embeddings.create(model=MODEL, input=SENTENCES[0])  # base64 on the wire
    floats = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float")
    b64 = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="base64")
    assert isinstance(b64.data[0].embedding, str)  # asked for explicitly: left encoded
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == MODEL
    assert np.array_equal(vectors(floats), vectors(b64))
    assert np.allclose(vectors(one)[0], vectors(floats)[0], atol=1e-6)  # B=1 vs B=4 graph
    eat, bread, baby = vectors(floats)
    assert eat @ bread > eat @ baby
    ids = [
        httpx.post(f"{base_url}/tokenize", json={"prompt": s}).json()["tokens"]
        for s in SENTENCES[:3]
    ]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert np.allclose(vectors(by_ids), vectors(floats), atol=1e-6)
    raw = httpx.post(
        f"{base_url}/v1/embeddings",
        json={"model": MODEL, "input": SENTENCES[0], "encoding_format": "base64"},
    ).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(data, "<f4"), vectors(one)[0])


def test_openai_client_string_list_base64_and_token_ids(client, base_url):
    check_embeddings(client, base_url)
    assert metric(base_url, "aotlm:compiles_after_ready") == 0


def test_too_long_input_is_400_unless_truncation_is_asked_for(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input=LONG)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    assert "302 tokens" in e.value.message and "maximum input length is 128" in e.value.message
    truncated = client.embeddings.create(
        model=MODEL,
        input=[LONG, "short"],
        encoding_format="float",
        extra_body={"truncate_prompt_tokens": -1},
    )
    assert truncated.usage.prompt_tokens == 128 + 3
    cut = client.embeddings.create(
        model=MODEL, input=LONG, encoding_format="float", extra_body={"truncate_prompt_tokens": 128}
    )
    assert np.array_equal(vectors(cut)[0], vectors(truncated)[0])
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens must be"):
        client.embeddings.create(model=MODEL, input="hi", extra_body={"truncate_prompt_tokens": 0})


def test_concurrent_requests_are_batched_and_nothing_compiles(client, base_url, embedder):
    alone = [
        vectors(client.embeddings.create(model=MODEL, input=s, encoding_format="float"))[0]
        for s in SENTENCES
    ]
    before = embedder.num_groups
    requests = SENTENCES * 2
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(
            pool.map(
                lambda s: client.embeddings.create(model=MODEL, input=s, encoding_format="float"),
                requests,
            )
        )
    assert embedder.num_groups - before < len(requests)  # several requests shared a group
    for s, r in zip(requests, got, strict=True):
        a, b = alone[SENTENCES.index(s)], vectors(r)[0]
        assert 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < 1e-6
    assert metric(base_url, "aotlm:compiles_after_ready") == 0
    assert metric(base_url, "aotlm:real_tokens_total") > 0


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"input": []}, 400, "input must not be empty"),
        ({"input": [[]]}, 400, "empty list of token ids"),
        ({"input": [[1, 10**6]]}, 400, r"token ids must be in \[0, 30522\)"),
        ({"input": "hi", "dimensions": 64}, 400, "have 384 dimensions"),
        ({"input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"input": "hi", "model": "gpt-9"}, 404, "does not exist"),
        ({"prompt": "hi"}, 400, "input"),
    ],
)
def test_bad_embedding_requests(base_url, body, status, match):
    r = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert re.search(match, r.json()["error"]["message"]), r.text


def test_generation_routes_on_an_embedding_model_are_400(client, base_url):
    with pytest.raises(openai.BadRequestError, match="is an embedding model") as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="serves /v1/embeddings, not /v1/chat"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    [card] = client.models.list().data
    assert card.id == MODEL and card.max_model_len == 128
    assert httpx.get(f"{base_url}/ready").status_code == 200


def test_embeddings_on_a_decoder_model_are_400():
    engine = AsyncEngine(FakeEngine)
    with serving(create_app(engine, model_name="tiny")) as url:
        assert engine.wait_loaded(10)
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "hi"})
        assert r.status_code == 400 and "is not an embedding model" in r.text
    engine.shutdown()


def test_aotlm_serve_serves_embeddings_and_drains_on_sigterm(minilm_bundle):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "aotlm", "serve", str(minilm_bundle[0]), "--port", str(port)]
    cmd += ["--strict", "--served-model-name", MODEL]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        check_embeddings(client_for(base), base)
        assert metric(base, "aotlm:compiles_after_ready") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
