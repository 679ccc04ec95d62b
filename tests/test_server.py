"""The OpenAI-compatible server, driven by the official `openai` client against real uvicorn
servers on 127.0.0.1. One engine (one bundle load) serves every app in this module."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from serve_helpers import wait_ready
from test_async_engine import REPLY, FakeEngine

from aotlm.buckets.planner import plan_from_trace
from aotlm.buckets.traffic import read_trace
from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.http.server import create_app
from aotlm.runtime.http.traffic_recorder import TraceRecorder

MODEL, KEY = "tiny", "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_SEQ_LEN = 128  # bundle_factory's default


@contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Iterator[AsyncEngine]:
    ae = AsyncEngine.from_bundle(tiny_bundle[0])
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def base_url(engine) -> Iterator[str]:
    with serving(create_app(engine, model_name=MODEL, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(base_url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base_url}/metrics").text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_idle(base_url: str) -> None:
    deadline = time.monotonic() + 10
    names = ("aotlm:kv_pages_used", "aotlm:num_requests_running", "aotlm:num_requests_waiting")
    while any(metric(base_url, n) for n in names):
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)


def complete(client, prompt, **kw) -> openai.types.Completion:
    """Greedy unless told otherwise."""
    return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, **kw})


def tokenize(base_url: str, **body) -> dict:
    return httpx.post(f"{base_url}/tokenize", json=body, headers=AUTH).json()


def test_health_ready_metrics_are_open_and_models_listed(base_url, client):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(base_url + path).status_code == 200, path
    [card] = client.models.list().data
    assert card.id == MODEL and card.max_model_len == MAX_SEQ_LEN


def test_completion_text_usage_and_token_prompts(base_url, client):
    r = complete(client, "The cat sat", max_tokens=12)
    ids = tokenize(base_url, prompt="The cat sat")["tokens"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert complete(client, ids, max_tokens=12).choices[0].text == r.choices[0].text
    long = "The cat sat on the mat and looked at the birds in the garden all day long " * 2
    first, again = (complete(client, long, max_tokens=2).usage for _ in range(2))
    assert (
        again.prompt_tokens_details.cached_tokens >= 16 > first.prompt_tokens_details.cached_tokens
    )
    assert metric(base_url, "aotlm:prefix_cache_hits_total") >= 16
    batch = complete(client, ["The cat sat", "A dog"], max_tokens=4, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert (
        batch.choices[0].text
        == batch.choices[1].text
        == r.choices[0].text[: len(batch.choices[0].text)]
    )


def test_chat_completion_renders_the_template_once(base_url, client):
    messages = [{"role": "user", "content": "Tell me about cats"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    tok = tokenize(base_url, messages=messages)
    assert r.usage.prompt_tokens == tok["count"]
    bos = tokenize(base_url, prompt="", add_special_tokens=True)["tokens"]
    assert tok["tokens"].count(bos[0]) == 1  # the template's BOS, not a second one
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content


def test_streaming_equals_non_streaming_and_ends_with_usage(client):
    whole = complete(client, "Once upon", max_tokens=20)
    chunks = list(
        complete(
            client, "Once upon", max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    assert stream[-1].usage.total_tokens == chat.usage.total_tokens


def test_n_choices_and_seeded_sampling_are_reproducible(client):
    def sample(seed):
        r = client.completions.create(
            model=MODEL, prompt="The sun", max_tokens=10, n=3, temperature=1.0, seed=seed
        )
        return [c.text for c in r.choices]

    first = sample(7)
    assert len(first) == 3 and len(set(first)) > 1
    assert sample(7) == first
    assert sample(8) != first


def test_stop_strings_cut_the_text_streamed_or_not(client):
    text = complete(client, "In the garden", max_tokens=24).choices[0].text
    start = next(i for i in range(2, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    expected = text[: text.find(stop)]
    r = complete(client, "In the garden", max_tokens=24, stop=[stop, "never seen"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(complete(client, "In the garden", max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_penalties_change_greedy_text_and_are_not_refused(base_url, client):
    plain = complete(client, "The cat sat on the mat", max_tokens=40).choices[0].text
    r = complete(client, "The cat sat on the mat", max_tokens=40, frequency_penalty=2.0)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "The cat sat on the mat"}],
        max_tokens=12,
        temperature=0,
        presence_penalty=1.5,
        extra_body={"repetition_penalty": 1.3},
    )
    assert r.choices[0].text != plain and chat.choices[0].message.content
    assert metric(base_url, "aotlm:compiles_after_ready") == 0


def test_record_trace_writes_what_the_planner_reads(engine, base_url, tmp_path):
    path = tmp_path / "served.jsonl"
    app = create_app(engine, model_name=MODEL, trace=TraceRecorder(path))
    with serving(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        ids = tokenize(base_url, prompt="The cat sat")["tokens"]
        complete(c, ids, max_tokens=5)
        complete(c, "A dog", max_tokens=3, n=2)
        list(complete(c, "Hello", max_tokens=4, stream=True))
        real = metric(url, "aotlm:real_tokens_total")
        assert metric(url, "aotlm:padded_tokens_total") >= real > 0  # what to re-plan against
    trace = read_trace(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace[:1]] == [(len(ids), 5)]
    assert [r.output_tokens for r in trace] == [5, 3, 3, 4]
    assert all(r.arrival is not None and r.arrival >= 0 for r in trace)
    plan = plan_from_trace(path, 10, max_tokens_per_step=64, max_seqs_per_step=4)
    assert plan.planned.graphs <= 10 and plan.source["trace_requests"] == 4


def test_logprobs_and_top_logprobs(client):
    r = complete(client, "The river", max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            {"prompt": "word " * 200, "max_tokens": 4},
            r"maximum context length is 128 tokens.* \d{3} tokens",
        ),
        ({"prompt": "hi", "max_tokens": 500}, "max_tokens=500"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "presence_penalty": 2.5}, r"presence_penalty must be .*\[-2, 2\]"),
        ({"prompt": "hi", "repetition_penalty": 0}, r"repetition_penalty must be .*\(0, inf\)"),
        ({"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias=.* is not supported"),
        ({"prompt": "hi", "n": 0}, "n must be"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt: Field required"),
    ],
)
def test_bad_completion_requests_are_400(base_url, body, match):
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, **body}, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(match, error["message"]), error["message"]


def test_bad_chat_requests_are_400(client, base_url):
    with pytest.raises(openai.BadRequestError, match="role must be"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400


def test_unknown_model_is_404_and_a_missing_key_401(base_url, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{base_url}/tokenize", json={"prompt": "x"}).status_code == 401


def test_ready_waits_for_the_load_and_health_reports_a_dead_engine():
    fake, release = FakeEngine(), threading.Event()
    loading = AsyncEngine(lambda: release.wait(10) and fake)
    with serving(create_app(loading, model_name=MODEL)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        assert loading.wait_loaded(5)
        assert httpx.get(f"{url}/ready").status_code == 200
        fake.fail = RuntimeError("device lost")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        assert httpx.get(f"{url}/ready").status_code == 503
    loading.shutdown()


def test_batched_prompts_stream_every_choice_with_usage():
    fake = FakeEngine()
    ae = AsyncEngine(lambda: fake)
    with serving(create_app(ae, model_name=MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        chunks = list(
            complete(
                client,
                ["ab", "c"],
                n=2,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    ae.shutdown()
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        [c] = chunk.choices
        texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == dict.fromkeys(range(4), REPLY[:8].decode())
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 32)


def test_tokenize_detokenize_round_trip(base_url):
    tok = tokenize(base_url, prompt="Hello world", return_token_strs=True)
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"])
    assert tok["max_model_len"] == MAX_SEQ_LEN
    back = httpx.post(f"{base_url}/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH)
    assert back.json()["prompt"] == "Hello world"


def test_a_full_queue_answers_503(engine):
    with serving(create_app(engine, model_name=MODEL, max_queued=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

        def one(i):
            try:
                client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=48)
                return 200
            except openai.APIStatusError as e:
                assert e.body["type"] == "service_unavailable"
                return e.status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(16)))
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        assert set(statuses) == {200, 503}
        wait_idle(url)


def test_a_client_disconnect_mid_stream_frees_its_pages(base_url):
    aborted = metric(base_url, "aotlm:request_success_total", '{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": 110, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(base_url, "aotlm:kv_pages_used") > 0
    wait_idle(base_url)
    after = metric(base_url, "aotlm:request_success_total", '{finished_reason="abort"}')
    assert after == aborted + 1


def test_concurrent_greedy_equals_sequential_and_nothing_leaks(base_url, client):
    prompts = [f"Story number {i} begins" + " again" * i for i in range(8)]
    alone = [complete(client, p, max_tokens=16).choices[0].text for p in prompts]

    def noise(i):  # sampled, streamed and n>1 traffic mixed in
        stream = complete(client, f"noise {i}", max_tokens=20, temperature=0.9, n=2, stream=True)
        return sum(1 for _ in stream)

    with ThreadPoolExecutor(12) as pool:
        noisy = [pool.submit(noise, i) for i in range(4)]
        together = list(
            pool.map(lambda p: complete(client, p, max_tokens=16).choices[0].text, prompts)
        )
        assert all(f.result() for f in noisy)
    assert together == alone
    wait_idle(base_url)
    assert metric(base_url, "aotlm:compiles_after_ready") == 0
    assert metric(base_url, "aotlm:prompt_tokens_total") > 0
    assert metric(base_url, "aotlm:time_to_first_token_seconds_count") > 0


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_bundle, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "aotlm",
        "serve",
        str(tiny_bundle[0]),
        "--port",
        str(port),
        "--record-trace",
        str(tmp_path / "trace.jsonl"),
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        body = {"prompt": "Hello", "max_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            events = [next(lines), next(lines)]
            proc.send_signal(signal.SIGTERM)  # mid-stream
            events += list(lines)
        assert events[-1] == "data: [DONE]"
        assert (
            json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        )
        assert proc.wait(30) == 0
        [line] = read_trace(tmp_path / "trace.jsonl")  # the drained request was recorded
        assert line.output_tokens == 60
    finally:
        proc.kill()
