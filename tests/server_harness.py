"""Run a quantpress app on a loopback port, for tests with real clients: in a background thread
(`running`), or in a child process (`serving_process`) when a test measures the server alone."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

STARTUP_TIMEOUT_S = 30.0


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def sse_payloads(body: bytes, *, prefix: bytes = b"data:") -> list[bytes]:
    """The data of each event of a complete SSE body, checking every event is `<prefix>...\\n\\n`."""
    assert body.endswith(b"\n\n"), body[-200:]
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(prefix) and b"\n" not in event, event
    return [event[len(prefix):] for event in events]


def tgi_events(body: bytes) -> list[dict]:
    payloads = sse_payloads(body)
    assert all(not p.startswith(b" ") for p in payloads), "TGI frames have no space after `data:`"
    return [json.loads(p) for p in payloads]


def openai_events(body: bytes) -> list[dict]:
    payloads = sse_payloads(body, prefix=b"data: ")
    assert payloads[-1] == b"[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass(frozen=True)
class ServerProcess:
    url: str
    pid: int


@contextmanager
def serving_process(model_dir: str | Path, *options: str) -> Iterator[ServerProcess]:
    """Run `quantpress serve model_dir *options` in a child process until the block ends.

    The real command, in a process of its own: what it measures (RSS) is the server alone, with
    the process setup `serve` does, and a client's own work (building a 10 MB body, say) cannot
    hold the server's event loop up through a shared GIL.
    """
    with socket.socket() as probe:  # a free port; the child binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads while it serves
        # one intra-op thread, as the tests' own models run (conftest): the box is shared
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        child = subprocess.Popen([sys.executable, "-m", "quantpress.cli", "serve", str(model_dir), "--port",
                                  str(port), *options], stdout=log, stderr=log, env=env)
        try:
            wait_until(lambda: child.poll() is not None or _healthy(url), timeout=STARTUP_TIMEOUT_S * 4)
            if not _healthy(url):
                log.seek(0)
                raise RuntimeError(f"`quantpress serve` did not start:\n{log.read()[-3000:]}")
            yield ServerProcess(url, child.pid)
        finally:
            child.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _healthy(url: str) -> bool:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=1)  # no proxy from the env
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
