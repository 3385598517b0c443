"""GPTQModel 7.7 running a GPTQ folder on CPU, measured like bench/cpu_runtime_child.py — runs in
the GPTQModel peer venv only.

    PEER_PY bench/peers/gptqmodel_runtime.py GPTQ_DIR [--backend auto] [--threads 2]

Loads with `GPTQModel.load(..., device="cpu")` (the backend it picks, or the one named), then
measures with transformers' own generate: prefill tokens/s of one 512-token prompt, greedy decode
tokens/s of one stream and of 16 streams (batched, left-padded prompts of equal length, 64 new
tokens each, EOS ignored). Prints one JSON line with the backend GPTQModel chose.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gptqmodel import BACKEND, GPTQModel

    before = rss_mib()
    backend = BACKEND[args.backend.upper()]
    model = GPTQModel.load(args.model, device="cpu", backend=backend)
    loaded_mib = rss_mib() - before
    hf = model.model
    kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
    stream_bytes = sum(t.numel() * t.element_size() for m in hf.modules() for name, t in m.named_buffers(recurse=False)
                       if name in ("qweight", "qzeros", "scales"))
    stream_bytes += sum(m.weight.numel() * m.weight.element_size() for m in hf.modules()
                        if isinstance(m, torch.nn.Linear))
    vocab = hf.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)

    def ids(n: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab, (n, length), generator=g)

    def generate(batch: torch.Tensor, new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    generate(ids(1, 32), 4)  # warm-up
    result = {"variant": f"gptqmodel:{args.backend}", "kernels": kernels, "loaded_mib": loaded_mib,
              "threads": args.threads, "stream_bytes": stream_bytes}
    prefill = min(generate(ids(1, args.prefill_tokens), 1) for _ in range(2))
    result["prefill_tok_s"] = args.prefill_tokens / prefill
    for n in (1, 16):
        batch = ids(n, 32)
        first = min(generate(batch, 1) for _ in range(2))
        total = min(generate(batch, args.new_tokens) for _ in range(2))
        result[f"decode_tok_s_{n}"] = n * (args.new_tokens - 1) / (total - first)
    result["after_generation_mib"] = rss_mib() - before
    print(json.dumps(result))


if __name__ == "__main__":
    main()
