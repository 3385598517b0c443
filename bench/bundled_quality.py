"""GPTQ vs RTN on the bundled model: wikitext-2 test perplexity and size, one row per setting.

Small models barely react to 4 bits, so the interesting rows are 3 and 2 bits.

    python bench/bundled_quality.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import quantpress
from quantpress import CalibrationConfig, Method, QuantConfig

SETTINGS = [(4, 128), (3, 128), (3, -1), (2, 64)]  # (bits, group_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    src = quantpress.bundled_model_dir()
    calibration = CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen)
    fp = quantpress.evaluate(src).perplexity
    print(f"bundled tiny-llama, wikitext-2 test (seqlen {args.seqlen}), calibration wikitext2 {args.nsamples}x{args.seqlen}\n")
    print("| bits | group | RTN ppl | GPTQ act-order ppl | RTN Δ | GPTQ Δ | size (MiB) | GPTQ time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 16 | - | {fp:.2f} | {fp:.2f} | | | {sum(f.stat().st_size for f in src.glob('*.safetensors')) / 2**20:.2f} | |")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in SETTINGS:
            rtn = QuantConfig(bits=bits, group_size=group, method=Method.RTN)
            gptq = QuantConfig(bits=bits, group_size=group, act_order=True)
            r_rtn = quantpress.quantize(src, Path(tmp) / quantpress.variant_name(rtn), rtn, None)
            r_gptq = quantpress.quantize(src, Path(tmp) / quantpress.variant_name(gptq), gptq, calibration)
            p_rtn = quantpress.evaluate(r_rtn.out_dir).perplexity
            p_gptq = quantpress.evaluate(r_gptq.out_dir).perplexity
            print(f"| {bits} | {group} | {p_rtn:.2f} | {p_gptq:.2f} | {p_rtn / fp - 1:+.2%} | {p_gptq / fp - 1:+.2%} "
                  f"| {r_gptq.size_bytes / 2**20:.2f} | {r_gptq.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
