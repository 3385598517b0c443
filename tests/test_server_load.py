"""`quantpress serve` under load and abuse: concurrent streams, clients that hang up, a full queue,
engine failures. The server must deliver every token, free what it no longer needs, and stay up."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx2 as httpx
import openai
import pytest
from server_harness import openai_events, running, tgi_events, wait_until

import quantpress
from quantpress.runtime import engine as engine_module
from quantpress.server import ServerSettings, create_app

TIMEOUT = 60.0
LONG = 480  # new tokens a request would take ~1 s or more to finish: long enough to abandon it



@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, ServerSettings(model_id="tiny-llama", max_batch_size=16))


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=64)) as client:
        yield client


def engine_of(app):
    return app.state.quantpress.engine


def assert_healthy(http) -> None:
    assert http.get("/health").status_code == 200
    r = http.post("/generate", json={"inputs": "ROMEO:", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["generated_text"]


def assert_drained(app, tokens_before: int, *, budget: int) -> None:
    """The engine's batch empties, having generated far fewer tokens than the abandoned request asked for."""
    engine = engine_of(app)
    assert wait_until(lambda: engine.stats.batch_size == 0 and engine.stats.queue_size == 0)
    assert engine.stats.tokens_generated_total - tokens_before < budget


def stream_once(http, parameters: dict) -> tuple[list[dict], int]:
    r = http.post("/generate_stream", json={"inputs": "ROMEO:", "parameters": {**parameters, "details": True}})
    assert r.status_code == 200, r.text
    return tgi_events(r.content), r.status_code


def load_settings(i: int) -> dict:
    """Request i of the load test: greedy, sampling by `do_sample`, or sampling by a warper alone."""
    parameters = {"max_new_tokens": 12 + i % 9, "seed": 100 + i}
    if i % 4 == 3:
        return {**parameters, "repetition_penalty": 1.2}  # greedy
    if i % 2:
        return {**parameters, "temperature": 0.5 + 0.1 * (i % 5)}  # a warper alone samples (TGI)
    return {**parameters, "do_sample": True, "top_k": 5 + i, "top_p": 0.9}


def test_32_concurrent_streams_deliver_every_token(http):
    settings = [load_settings(i) for i in range(32)]
    seeded = settings[4]
    alone, _ = stream_once(http, seeded)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: stream_once(http, p)[0], settings))
    for parameters, events in zip(settings, results):
        last = events[-1]
        assert last["details"]["generated_tokens"] == len(events) <= parameters["max_new_tokens"]
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        assert text == last["generated_text"]
        sampled = parameters.get("do_sample") or "temperature" in parameters
        assert last["details"]["seed"] == (parameters["seed"] if sampled else None)
    assert results[4][-1]["generated_text"] == alone[-1]["generated_text"]  # same text alone and under load
    assert_healthy(http)


def test_bad_requests_leave_the_server_up(http):
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = http.post("/generate", json={"inputs": " the" * 600, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = http.post("/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": -1}})
    assert r.status_code == 422 and "`max_new_tokens` must be strictly positive" in r.json()["error"]
    assert_healthy(http)


@pytest.mark.parametrize("path", ["/generate_stream", "/v1/chat/completions"])
def test_a_client_that_hangs_up_mid_stream_frees_its_slot(http, app, path):
    before = engine_of(app).stats.tokens_generated_total
    if path == "/generate_stream":
        body = {"inputs": "ROMEO:", "parameters": {"max_new_tokens": LONG}}
    else:
        body = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": LONG, "stream": True}
    with http.stream("POST", path, json=body) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                break
    assert_drained(app, before, budget=LONG // 2)
    assert_healthy(http)


def test_a_client_that_hangs_up_before_the_reply_frees_its_slot(url, http, app):
    """Non-streamed: the whole reply is pending when the connection goes."""
    before = engine_of(app).stats.tokens_generated_total
    body = json.dumps({"inputs": "ROMEO:", "parameters": {"max_new_tokens": LONG}}).encode()
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_until(lambda: engine_of(app).stats.batch_size == 1, timeout=5)
    assert_drained(app, before, budget=LONG // 2)
    assert_healthy(http)


def test_a_full_queue_answers_429_and_the_rest_complete(loaded):
    small = create_app(quantpress.load(quantpress.bundled_model_dir()),
                       ServerSettings(model_id="small", max_concurrent_requests=2, max_batch_size=1))
    body = {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 64}}
    with running(small) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: http.post("/generate", json=body), range(10)))
        statuses = sorted(r.status_code for r in replies)
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}
        for r in replies:
            if r.status_code == 429:
                assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            else:
                assert r.json()["generated_text"]
        metrics = http.get("/metrics").text
        assert f'tgi_request_failure{{err="overloaded"}} {statuses.count(429)}.0' in metrics
        with pytest.raises(openai.RateLimitError):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda _: client.completions.create(model="m", prompt="a", max_tokens=64), range(6)))
        assert_healthy(http)


@pytest.fixture
def failing_decode(monkeypatch):
    """Every decode step fails (prefill still works), as a kernel error would."""
    real = engine_module.ragged_forward

    def ragged_forward(model, tokens, caches, **kwargs):
        if all(len(t) == 1 for t in tokens):
            raise RuntimeError("boom")
        return real(model, tokens, caches, **kwargs)

    monkeypatch.setattr(engine_module, "ragged_forward", ragged_forward)


def test_engine_failures_are_424_or_an_error_event(http, url, failing_decode):
    r = http.post("/generate", json={"inputs": "ROMEO:", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 424
    assert r.json() == {"error": "Request failed during generation: RuntimeError: boom", "error_type": "generation"}

    r = http.post("/generate_stream", json={"inputs": "ROMEO:", "parameters": {"max_new_tokens": 5}})
    events = tgi_events(r.content)
    assert len(events) == 2 and events[0]["index"] == 1  # the prefill's token, then the failure
    assert events[1] == {"error": "Request failed during generation: RuntimeError: boom", "error_type": "generation"}

    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 5,
                                                "stream": True})
    last = openai_events(r.content)[-1]
    assert last["error"]["message"].endswith("RuntimeError: boom") and last["error_type"] == "generation"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="boom"):
        list(client.completions.create(model="m", prompt="ROMEO:", max_tokens=5, stream=True))


def test_server_is_healthy_after_the_abuse(http, app):
    assert_healthy(http)
    assert engine_of(app).stats.batch_size == 0
