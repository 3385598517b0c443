"""Peak RSS of `quantpress.quantize` as depth grows at fixed width (one layer in memory at a time).

Builds random-initialised Llamas of the same width (timing and memory do not depend on trained
weights), saves them in bf16, and quantizes each in a fresh subprocess that reports its own peak
RSS. Prints a markdown table.

Both steps run in subprocesses and this parent never imports torch: Linux keeps a process's
peak RSS (ru_maxrss) across fork + exec, so a child forked from a parent that once held a model
would report the parent's high-water mark instead of its own.

    python bench/memory_depth.py --layers 4 16 --hidden 1024 --intermediate 2816 --nsamples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
import quantpress
from quantpress import CalibrationConfig, QuantConfig
src, out, nsamples, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
examples = torch.randint(0, 32000, (nsamples, seqlen))
t = time.perf_counter()
report = quantpress.quantize(src, out, QuantConfig(bits=4, group_size=128), CalibrationConfig(nsamples=nsamples, seqlen=seqlen), examples=examples)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "size_mib": report.size_bytes / 2**20}))
"""


MAKE_MODEL = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
path, layers, hidden, intermediate = sys.argv[1], *map(int, sys.argv[2:5])
config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                     max_position_embeddings=2048)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(path)
print(sum(p.numel() for p in model.parameters()))
"""


def make_model(path: Path, layers: int, hidden: int, intermediate: int) -> int:
    result = subprocess.run([sys.executable, "-c", MAKE_MODEL, str(path), str(layers), str(hidden), str(intermediate)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            src = Path(tmp) / f"llama-{layers}"
            params = make_model(src, layers, args.hidden, args.intermediate)
            result = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"q-{layers}"),
                                     str(args.nsamples), str(args.seqlen)], capture_output=True, text=True, check=True)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            source_mib = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
            rows.append((layers, params / 1e6, source_mib, stats))
    print(f"width hidden={args.hidden} intermediate={args.intermediate}, calibration {args.nsamples}x{args.seqlen}, 4-bit g128\n")
    print("| layers | params (M) | source bf16 (MiB) | quantize (s) | peak RSS (MiB) | output (MiB) |")
    print("|---|---|---|---|---|---|")
    for layers, params, source_mib, s in rows:
        print(f"| {layers} | {params:.0f} | {source_mib:.0f} | {s['seconds']:.1f} | {s['peak_rss_mib']:.0f} | {s['size_mib']:.0f} |")
    if len(rows) > 1:
        growth = rows[-1][3]["peak_rss_mib"] / rows[0][3]["peak_rss_mib"] - 1
        print(f"\npeak RSS growth from {rows[0][0]} to {rows[-1][0]} layers: {growth:+.1%}")


if __name__ == "__main__":
    main()
