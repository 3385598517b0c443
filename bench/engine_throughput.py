"""Aggregate decode throughput of the continuous-batching engine with 1, 4 and 16 concurrent streams.

Every stream is greedy, has a prompt of the same length (different random token ids) and asks
for the same number of new tokens; all streams of a row are submitted at once and the clock runs
from the first submit to the last stream's final event (prefill included). Prints a markdown table;
it does not write BENCHMARKS.md.

    python bench/engine_throughput.py                       # the bundled model
    python bench/engine_throughput.py --model out/my-gptq --streams 1 4 16 32 --threads 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, table

import quantpress
from quantpress.runtime.engine import Engine, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(quantpress.bundled_model_dir()), help="model folder (fp or GPTQ)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams per row")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="pad decode steps to 16 rows so outputs do not depend on load (the engine default)")
    return p.parse_args()


def run_once(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """Submit every prompt at once; return (tokens generated, seconds until the last one ended)."""
    start = time.perf_counter()
    streams = [engine.submit(p, params) for p in prompts]
    tokens = sum(len(list(s)) for s in streams)  # events are buffered, so reading in turn is fine
    return tokens, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = quantpress.load(args.model)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0)  # greedy
    engine = Engine(loaded, max_batch_size=max(args.streams), batch_invariant=args.batch_invariant)
    engine.start()
    g = torch.Generator().manual_seed(0)
    try:
        run_once(engine, [torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist()], params)  # warm-up
        rows, base = [], None
        for n in args.streams:
            prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(n)]
            tokens, seconds = min((run_once(engine, prompts, params) for _ in range(args.repeats)),
                                  key=lambda r: r[1])
            rate = tokens / seconds
            base = base or rate
            rows.append([n, f"{rate:.0f}", f"{rate / n:.0f}", f"{rate / base:.2f}x"])
    finally:
        engine.close()
    print(f"Engine throughput: {Path(args.model).name}, greedy, {args.prompt_tokens}-token prompts, "
          f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"batch_invariant={args.batch_invariant}, best of {args.repeats}\n")
    print(table(["streams", "tokens/s (aggregate)", "tokens/s per stream", "vs 1 stream"], rows))
    print(f"\n{machine()}\n\n`{command_line()}`")


if __name__ == "__main__":
    main()
