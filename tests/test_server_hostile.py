"""`quantpress serve` against hostile input (issue 11, findings 4, 7 and 8).

The real command runs in a child process (server_harness.serving_process): its resident set is
the server's alone, and the client's own work (building a 10 MB body) cannot slow the server
down through a shared GIL, so both the RSS and the /health latency measured here are the
server's. Every probe goes over one hand-spoken keep-alive connection, so "the connection is
still usable" means the very same socket answers /health afterwards.

The model folder is the bundled model with a chat template that misbehaves on cue: the last
message's content picks the misbehaviour.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil
import pytest
from server_harness import serving_process, wait_until

import quantpress

HOSTILE_TEMPLATE = """{%- set cue = messages[-1]['content'] -%}
{%- if cue == 'loop' -%}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}
{%- elif cue == 'power' -%}{{ 10**(10**7) > 1 }}
{%- elif cue == 'divide' -%}{{ 1/0 }}
{%- elif cue == 'recurse' -%}{% macro deeper(n) %}{{ deeper(n + 1) }}{% endmacro %}{{ deeper(0) }}
{%- elif cue == 'huge' -%}{{ 'x' * 10**10 }}
{%- else -%}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>
{%- endif -%}"""
TEMPLATE_CUES = ["loop", "power", "divide", "recurse", "huge"]

HEALTH_BUDGET_S = 0.2  # /health must answer this fast while a hostile request is in flight
STREAMS = 64
TIMEOUT_S = 60.0
TEN_MB = 10 * 2**20
NEAR_LIMIT = "hello world " * (1_900_000 // 12)  # just under the 2 MB default limit: tokenized in full


# -- a keep-alive HTTP/1.1 connection, spoken by hand ---------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


class Connection:
    """One socket: every request goes over it, so a server that drops the connection fails the next."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def request(self, method: str, path: str, body: bytes | None = None, *,
                chunks: Iterator[bytes] | None = None) -> Reply:
        head = [f"{method} {path} HTTP/1.1", "Host: quantpress", "Content-Type: application/json"]
        if chunks is not None:
            self.sock.sendall(("\r\n".join([*head, "Transfer-Encoding: chunked"]) + "\r\n\r\n").encode())
            for chunk in chunks:
                self.sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.sock.sendall(b"0\r\n\r\n")
        else:
            body = body or b""
            self.sock.sendall(("\r\n".join([*head, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body)
        return self.read_reply()

    def post_json(self, path: str, payload: dict) -> Reply:
        return self.request("POST", path, json.dumps(payload).encode())

    def read_reply(self) -> Reply:
        status_line = self.reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), f"connection dropped or garbled: {status_line!r}"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers.get("connection") != "close", "the server closes the connection"
        return Reply(int(status_line.split()[1]), headers, self.reader.read(int(headers["content-length"])))

    def assert_alive(self) -> None:
        assert self.request("GET", "/health").status == 200


# -- fixtures and checks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "hostile-llama"
    shutil.copytree(quantpress.bundled_model_dir(), folder)
    (folder / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
    with serving_process(folder, "--model-id", "hostile", "--max-batch-size", str(STREAMS)) as process:
        yield process


@pytest.fixture(scope="module", autouse=True)
def baseline_rss(server) -> int:
    """The server's RSS once it has served a little of everything a well-behaved client sends,
    taken before the module's first test (autouse), whichever that is."""
    conn = Connection(server.url)
    for _ in range(3):
        assert conn.post_json("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 8}}).status == 200
        assert conn.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 8}).status == 200
        assert conn.post_json("/tokenize", {"inputs": "ROMEO: hello"}).status == 200
    conn.close()
    return psutil.Process(server.pid).memory_info().rss


@pytest.fixture
def conn(server) -> Iterator[Connection]:
    connection = Connection(server.url)
    yield connection
    connection.close()


def assert_tgi_error(reply: Reply, status: int, error_type: str, match: str = "") -> None:
    body = reply.json()
    assert reply.status == status, body
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert match in body["error"], body


def assert_openai_error(reply: Reply, status: int, code: str, match: str = "") -> None:
    body = reply.json()
    assert reply.status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and match in body["error"]["message"], body


@contextmanager
def health_watch(url: str) -> Iterator[list[float]]:
    """Polls /health on a connection of its own while the block runs; yields the latencies seen."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        watcher = Connection(url)
        while not stop.is_set():
            start = time.perf_counter()
            watcher.assert_alive()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
        watcher.close()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)


def while_watching_health(url: str, probe: Callable[[], Reply]) -> Reply:
    """The reply to `probe`, asserting /health stayed fast while it was in flight."""
    with health_watch(url) as latencies:
        time.sleep(0.05)  # the watcher's first poll, before the probe starts
        reply = probe()
    assert latencies, "/health was never answered"
    assert max(latencies) < HEALTH_BUDGET_S, f"/health took {max(latencies):.3f} s during the probe"
    return reply


def metric(url: str, name: str) -> float:
    conn = Connection(url)
    text = conn.request("GET", "/metrics").body.decode()
    conn.close()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# -- finding 4: size limit, blocking work off the event loop, bounded templates -----------------------


def test_a_10_mb_body_is_refused_with_413_while_it_is_read(server, conn):
    big = json.dumps({"inputs": "hello " * (TEN_MB // 6)}).encode()
    reply = while_watching_health(server.url, lambda: conn.request("POST", "/generate", big))
    assert_tgi_error(reply, 413, "payload_too_large", "exceeds the limit of 2000000 bytes")
    conn.assert_alive()
    chat = json.dumps({"messages": [{"role": "user", "content": "hello " * (TEN_MB // 6)}]}).encode()
    assert_openai_error(conn.request("POST", "/v1/chat/completions", chat), 413, "payload_too_large")
    conn.assert_alive()


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server, conn):
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(TEN_MB // 65536):
            yield b"x" * 65536

    reply = while_watching_health(server.url, lambda: conn.request("POST", "/generate", chunks=chunks()))
    assert_tgi_error(reply, 413, "payload_too_large")
    conn.assert_alive()


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/tokenize"])
def test_a_prompt_just_under_the_limit_is_tokenized_off_the_event_loop(server, conn, path):
    payload = {"prompt": NEAR_LIMIT} if path.startswith("/v1") else {"inputs": NEAR_LIMIT}
    reply = while_watching_health(server.url, lambda: conn.post_json(path, payload))
    if path.startswith("/v1"):
        assert_openai_error(reply, 422, "validation", "tokens")
    else:
        assert_tgi_error(reply, 422, "validation", "`inputs` must have less than 511 tokens")
    conn.assert_alive()


@pytest.mark.parametrize("cue", TEMPLATE_CUES)
def test_a_chat_template_that_misbehaves_is_a_422_and_stalls_nothing(server, conn, cue):
    start = time.perf_counter()
    reply = while_watching_health(server.url, lambda: conn.post_json(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": cue}], "max_tokens": 2}))
    assert_openai_error(reply, 422, "template_error", "Template error: the chat template")
    assert time.perf_counter() - start < 10  # the render budget is 1 s of CPU time
    conn.assert_alive()
    # and the template still renders a well-behaved conversation
    ok = conn.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status == 200, ok.body


# -- finding 7: JSON errors, never a bare 500 ---------------------------------------------------------------


@pytest.mark.parametrize(("body", "match"), [
    (b'{"inputs": "a\\ud800b"}', "lone surrogate U+D800"),
    (b'{"inputs": "ok", "parameters": {"stop": ["\\udfff"]}}', "lone surrogate U+DFFF"),
    (b'{"inputs": "a\xff\xfeb"}', "not valid UTF-8"),
    (b'{"inputs": "a\xed\xa0\x80b"}', "not valid UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b'{"inputs": "ROMEO:", ', "Failed to parse the request body as JSON"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_bodies_that_are_not_unicode_json_are_422_json_on_tgi_routes(conn, body, match):
    assert_tgi_error(conn.request("POST", "/generate", body), 422, "validation", match)
    conn.assert_alive()


def test_bodies_that_are_not_unicode_json_are_422_json_on_openai_routes(conn):
    chat = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert_openai_error(conn.request("POST", "/v1/chat/completions", chat), 422, "validation", "lone surrogate")
    assert_openai_error(conn.request("POST", "/v1/completions", b'{"prompt": "\xc3"}'), 422, "validation", "UTF-8")
    assert_openai_error(conn.request("POST", "/v1/completions", b"{"), 422, "validation", "JSON")
    conn.assert_alive()


@pytest.mark.parametrize(("parameters", "match"), [
    ({"max_new_tokens": -1}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 10**9}, "`inputs` tokens + `max_new_tokens` must be <= 512"),
    ({"max_new_tokens": 10**30}, "`inputs` tokens + `max_new_tokens` must be <= 512"),
    ({"stop": [f"s{i}" for i in range(1000)]}, "`stop` supports up to 4 stop sequences. Given: 1000"),
    ({"temperature": -1e-300}, "`temperature` must be strictly positive"),
])
def test_out_of_range_parameters_are_422(conn, parameters, match):
    assert_tgi_error(conn.post_json("/generate", {"inputs": "ROMEO:", "parameters": parameters}), 422, "validation",
                     match)
    conn.assert_alive()


def test_out_of_range_openai_parameters_are_422(conn):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(conn.post_json("/v1/chat/completions", {**chat, "max_tokens": 10**9}), 422, "validation")
    assert_openai_error(conn.post_json("/v1/chat/completions", {**chat, "stop": ["x"] * 1000}), 422, "validation",
                        "Given: 1000")
    conn.assert_alive()


# -- finding 8: every accepted sampling value samples ------------------------------------------------------


@pytest.mark.parametrize("parameters", [{"temperature": 1e-300}, {"top_p": 1e-300},
                                        {"temperature": 1e-300, "top_k": 1}])
def test_extreme_sampling_values_pick_the_greedy_tokens(conn, parameters):
    greedy = conn.post_json("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 6}})
    sampled = conn.post_json("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 6, "do_sample": True,
                                                                            "seed": 7, **parameters}})
    assert sampled.status == 200, sampled.body
    assert sampled.json()["generated_text"] == greedy.json()["generated_text"]


@pytest.mark.parametrize("parameters", [{"repetition_penalty": 1e-308}, {"repetition_penalty": 1e308},
                                        {"typical_p": 1e-300}, {"temperature": 1e300}])
def test_extreme_sampling_values_generate(conn, parameters):
    for do_sample in (False, True):
        reply = conn.post_json("/generate", {"inputs": "ROMEO: ROMEO: ROMEO:", "parameters": {
            "max_new_tokens": 6, "do_sample": do_sample, "seed": 1, **parameters}})
        assert reply.status == 200, reply.body
        assert reply.json()["generated_text"]


def test_extreme_openai_temperature_is_greedy(conn):
    def chat(temperature: float) -> Reply:
        return conn.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 6, "temperature": temperature, "seed": 3})

    tiny = chat(1e-300)
    assert tiny.status == 200, tiny.body
    assert tiny.json()["choices"][0]["message"] == chat(0).json()["choices"][0]["message"]


# -- dropped streams ------------------------------------------------------------------------------------------


def test_64_streams_dropped_abruptly_free_their_sequences(server, conn):
    successes = metric(server.url, "tgi_request_success")
    body = json.dumps({"inputs": "ROMEO:", "parameters": {"max_new_tokens": 500}}).encode()
    parts = urlsplit(server.url)
    sockets = []
    with health_watch(server.url) as latencies:
        for _ in range(STREAMS):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S)
            sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            sockets.append(sock)
        for sock in sockets:  # every stream is under way: it sent its first token
            received = b""
            while b"data:" not in received:
                received += sock.recv(4096)
        assert metric(server.url, "tgi_batch_current_size") == STREAMS
        for sock in sockets:  # hang up without a word: RST, no FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert wait_until(lambda: metric(server.url, "tgi_batch_current_size") == 0
                          and metric(server.url, "tgi_queue_size") == 0, timeout=10)  # run to the end: ~30 s
    assert max(latencies) < HEALTH_BUDGET_S, f"/health took {max(latencies):.3f} s"
    assert metric(server.url, "tgi_request_success") == successes  # cancelled, not run to the end
    reply = conn.post_json("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 4}})
    assert reply.status == 200 and reply.json()["generated_text"]


# -- memory ---------------------------------------------------------------------------------------------------


def test_memory_returns_to_baseline_after_the_abuse(server, baseline_rss, conn):
    """Runs the probes that allocate most once more, so it holds when run alone too."""
    big = json.dumps({"inputs": "hello " * (TEN_MB // 6)}).encode()
    for _ in range(4):
        assert conn.request("POST", "/generate", big).status == 413
        assert conn.post_json("/generate", {"inputs": NEAR_LIMIT}).status == 422
        assert conn.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": NEAR_LIMIT}]}).status \
            == 422
    for cue in ("huge", "power", "recurse"):
        assert conn.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": cue}]}).status == 422
    conn.assert_alive()
    process = psutil.Process(server.pid)
    assert wait_until(lambda: process.memory_info().rss < baseline_rss * 1.1, timeout=5), (
        f"RSS {process.memory_info().rss / 2**20:.0f} MB after the abuse, baseline {baseline_rss / 2**20:.0f} MB")
