"""Run a quantpress app on a loopback port in a background thread, for tests with real clients."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
