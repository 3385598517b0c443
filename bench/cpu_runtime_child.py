"""One quantpress runtime variant, measured in its own process for bench/cpu_runtime.py.

    python bench/cpu_runtime_child.py VARIANT MODEL_DIR [--threads 2] [--ppl-windows 10]

VARIANT: dense-bf16 / dense-fp32 (a full-precision folder), baseline (a GPTQ folder run the way
quantpress did before issue 13: every Linear dequantized once and kept dense in fp32, embedding
and head in fp32), packed (the new runtime, fp32 compute), packed-bf16 (the new runtime, bf16
compute), exact (the new runtime, exact dequantization at every call: the perplexity reference).
Prints one JSON line: resident MiB added by the load, prefill and decode tokens/s through the
engine (1 and 16 streams), perplexity on wikitext-2 test.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import quantpress
from quantpress.datasets import load_text
from quantpress.calibration import tokenize
from quantpress.evaluation import perplexity
from quantpress.runtime import kernels
from quantpress.runtime.engine import Engine, SamplingParams
from quantpress.runtime.qlinear import QuantLinear

LOADS = {  # variant -> load() keyword arguments
    "dense-bf16": {"dtype": torch.bfloat16}, "dense-fp32": {"dtype": torch.float32},
    "baseline": {"dtype": torch.float32, "exact": True}, "packed": {"dtype": torch.float32},
    "packed-bf16": {"dtype": torch.bfloat16}, "exact": {"dtype": torch.float32, "exact": True},
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def dense_like_before(model: nn.Module) -> None:
    """The pre-issue-13 runtime: dense fp32 weights for every quantized Linear, fp32 embedding/head."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.quantized_weight().dequantize(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.float(), requires_grad=False)
            model.set_submodule(name, linear)
    embedding = model.get_input_embeddings()
    dense = nn.Embedding.from_pretrained(embedding.weight.float(), freeze=True, padding_idx=embedding.padding_idx)
    model.set_input_embeddings(dense)
    head = model.get_output_embeddings()
    full = nn.Linear(head.in_features, head.out_features, bias=False)
    full.weight = dense.weight if head.weight is embedding.weight else nn.Parameter(head.weight.float())
    model.set_output_embeddings(full)


def weight_bytes_per_token(model: nn.Module) -> int:
    """What one decode step streams from memory: every Linear's weight in its runtime form (the
    packed codes and scale/offset pairs the kernel reads, or the dense matrix) and the head."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            read = ("packed", "scale_offsets") if hasattr(module.kernel, "packed") else ("weight", "qweight", "scales")
            total += sum(t.numel() * t.element_size() for name, t in module.kernel.named_buffers() if name in read)
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(seconds until every stream submitted at once has ended, tokens generated); greedy, up
    to `new_tokens` each (a stream may end earlier at EOS)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    start = time.perf_counter()
    streams = [engine.submit(p, params) for p in prompts]
    tokens = sum(len(list(s)) for s in streams)  # events are buffered: reading in turn is fine
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=sorted(LOADS))
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=10)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kernel-only", action="store_true",
                   help="route every row count to the int kernels (perplexity of the decode kernels)")
    args = p.parse_args()
    if args.kernel_only:  # a measurement switch for this bench only: the crossover constants
        kernels.DENSE_MIN_ROWS = dict.fromkeys(kernels.DENSE_MIN_ROWS, 1 << 30)
    torch.set_num_threads(args.threads)
    before = rss_mib()
    # as `quantpress serve` loads: on a thread that exits, so the engine's thread owns the only
    # OpenMP pool (runtime/engine.py, `inline`)
    with ThreadPoolExecutor(max_workers=1) as pool:
        loaded = pool.submit(quantpress.load, args.model, **LOADS[args.variant]).result()
    if args.variant == "baseline":
        dense_like_before(loaded.model)
    loaded_mib = rss_mib() - before
    stream_bytes = weight_bytes_per_token(loaded.model)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]

    result = {"variant": args.variant, "loaded_mib": loaded_mib, "threads": args.threads, "stream_bytes": stream_bytes}
    with Engine(loaded, max_batch_size=16) as engine:
        run(engine, prompts(1, 32), 4)  # warm-up
        result["prefill_tok_s"] = args.prefill_tokens / min(run(engine, prompts(1, args.prefill_tokens), 1)[0]
                                                            for _ in range(2))
        for n in (1, 16):
            batch = prompts(n, 32)
            first = min(run(engine, batch, 1)[0] for _ in range(2))  # prefill and the first token
            total, tokens = min(run(engine, batch, args.new_tokens) for _ in range(2))
            result[f"decode_tok_s_{n}"] = (tokens - n) / (total - first)
    result["after_generation_mib"] = rss_mib() - before
    if args.ppl_windows and loaded.tokenizer is not None:
        ids = tokenize(loaded.tokenizer, load_text("wikitext2", "evaluation"))
        result["perplexity"] = perplexity(loaded.model, ids, 512, batch_size=1, max_windows=args.ppl_windows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
