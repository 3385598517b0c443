"""Tokens/s of `quantpress serve` with 1, 4 and 16 concurrent streaming clients.

    python bench/serve_throughput.py [--model DIR] [--new-tokens 64] [--streams 1 4 16]

Starts the real server as a child process on loopback and drives `/generate_stream` (TGI SSE) with
N concurrent clients, each asking for exactly `--new-tokens` tokens (greedy, EOS ignored by a
stop-free prompt and `max_new_tokens`; a stream that ends early is counted as it is). Aggregate
tokens/s = all tokens received / wall time from the first request to the last event; per-stream
tokens/s = a stream's tokens / its own time. Continuous batching should make the aggregate at 16
streams several times that of 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, machine, table, write_section

PROMPT = "The history of the city begins in the"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy")


def one_stream(url: str, new_tokens: int, out: list, i: int) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "details": True}}
    started, tokens = time.perf_counter(), 0
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise SystemExit(f"stream {i}: {event}")
                tokens += 1
    out[i] = (tokens, time.perf_counter() - started)


def measure(url: str, streams: int, new_tokens: int) -> tuple[float, float]:
    results: list = [None] * streams
    threads = [threading.Thread(target=one_stream, args=(url, new_tokens, results, i)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    total = sum(n for n, _ in results)
    per_stream = sum(n / s for n, s in results) / streams
    return total / wall, per_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "src/quantpress/assets/models/tiny-llama"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "quantpress.cli", "serve", args.model, "--port", str(port),
                             "--max-batch-size", str(args.max_batch_size)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        measure(url, 1, 8)  # warm-up: first-call allocations and kernel selection
        rows = []
        for n in args.streams:
            aggregate, per_stream = measure(url, n, args.new_tokens)
            rows.append((n, aggregate, per_stream))
            print(f"{n} streams: {aggregate:.1f} tokens/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = rows[0][1]
    body = "\n\n".join([
        f"`{command_line()}`", f"Machine: {machine()}",
        f"Model `{Path(args.model).name}`, {args.new_tokens} new tokens per request, greedy, "
        f"`--max-batch-size {args.max_batch_size}`, through HTTP (`/generate_stream`).",
        table(["concurrent streams", "aggregate tokens/s", "per-stream tokens/s", "aggregate vs 1 stream"],
              [[n, f"{agg:.1f}", f"{per:.1f}", f"{agg / base:.2f}×"] for n, agg, per in rows]),
    ])
    print(body)
    write_section(f"serve-throughput-{Path(args.model).name}", body)


if __name__ == "__main__":
    main()
