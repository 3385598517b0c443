"""llama.cpp (llama-cpp-python) on CPU, measured like bench/cpu_runtime_child.py — runs in the
llama-cpp-python venv only (bench/peers/install_llamacpp.sh).

    PEER_PY bench/peers/llamacpp_runtime.py quantize MODEL-F16.gguf OUT.gguf Q4_K_M
    PEER_PY bench/peers/llamacpp_runtime.py measure MODEL.gguf [--threads 2]

`quantize` is llama.cpp's own quantizer (llama_model_quantize, no imatrix). `measure` prints one
JSON line: resident MiB added by the load, prefill tokens/s of one 512-token prompt, greedy decode
tokens/s of one stream (64 tokens, EOS ignored). llama-cpp-python's Llama object serves one
sequence, so there is no 16-stream number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def quantize(src: str, out: str, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")


def measure(path: str, threads: int, prefill_tokens: int, new_tokens: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    before = rss_mib()
    llm = Llama(model_path=path, n_ctx=prefill_tokens + new_tokens + 64, n_threads=threads,
                n_threads_batch=threads, n_batch=prefill_tokens, verbose=False)
    loaded_mib = rss_mib() - before
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()

    def prompt(n: int) -> list[int]:
        return rng.integers(3, vocab, n).tolist()

    def prefill(tokens: list[int]) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - start

    def decode(tokens: list[int]) -> float:
        """Seconds for new_tokens - 1 greedy steps after the first token."""
        llm.reset()
        llm.eval(tokens)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # a view: eval_logits copies to lists
            llm.eval([token])
        return time.perf_counter() - start

    prefill(prompt(32))  # warm-up
    # the whole file: every tensor is read per token (SmolLM2's head is its tied token_embd)
    result = {"variant": "llama.cpp", "model": path, "loaded_mib": loaded_mib, "threads": threads,
              "stream_bytes": os.path.getsize(path)}
    result["prefill_tok_s"] = prefill_tokens / min(prefill(prompt(prefill_tokens)) for _ in range(2))
    result["decode_tok_s_1"] = (new_tokens - 1) / min(decode(prompt(32)) for _ in range(2))
    result["after_generation_mib"] = rss_mib() - before
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("kind", help="Q4_0, Q4_K_M, ...")
    q.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--prefill-tokens", type=int, default=512)
    m.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    if args.command == "quantize":
        quantize(args.src, args.out, args.kind, args.threads)
    else:
        print(json.dumps(measure(args.model, args.threads, args.prefill_tokens, args.new_tokens)))


if __name__ == "__main__":
    main()
