"""Quantization wall time and peak RSS: quantpress vs GPTQModel vs llm-compressor, side by side,
then how quantpress grows with depth and with calibration tokens.

The model is a random-initialised Llama (timing does not depend on trained weights): hidden 1024,
intermediate 2816, vocab 32000, 16 heads, saved in bf16 (168M parameters at 8 layers). Every tool
gets the same 128 x 512 token windows from one safetensors file, 4-bit g128, no act-order, damp
0.1, and loads the model in bf16 (each tool's default for a bf16 checkpoint). Each run is a fresh
process measured with its own `wait4` rusage.

    python bench/speed_memory.py            # the peer table, then depth and token scaling
    python bench/speed_memory.py --skip-peers --layers 4 8 16 --samples 32 64 128

Peers run from their own virtualenvs (tests/peers/install_gptqmodel.sh,
bench/peers/install_llmcompressor.sh): --gptqmodel-python / --llmcompressor-python, or the
QUANTPRESS_PEER_GPTQMODEL_PYTHON / QUANTPRESS_PEER_LLMCOMPRESSOR_PYTHON environment variables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    ChildRun,
    command_line,
    machine,
    run_child,
    table,
    write_section,
)

MAKE_INPUTS = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
path, layers, examples, nsamples, seqlen = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
# GPTQModel refuses a folder without a tokenizer; any one will do, so take the bundled model's
# (token ids are random here and never decoded)
from transformers import AutoTokenizer
import quantpress
AutoTokenizer.from_pretrained(quantpress.bundled_model_dir()).save_pretrained(path)
save_file({"input_ids": torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))}, examples)
"""

QUANTPRESS = r"""
import json, sys, time
from safetensors.torch import load_file
import quantpress
from quantpress import CalibrationConfig, QuantConfig
src, out, examples, nsamples, true_sequential = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
ids = load_file(examples)["input_ids"][:nsamples]
t = time.perf_counter()
quant = QuantConfig(bits=4, group_size=128, true_sequential=true_sequential)
quantpress.quantize(src, out, quant, CalibrationConfig(nsamples=len(ids), seqlen=ids.shape[1]),
                    examples=ids, overwrite=True)
print(json.dumps({"quantize_seconds": time.perf_counter() - t, "tool": "quantpress", "version": quantpress.__version__}))
"""

SETTINGS = ["--bits", "4", "--group-size", "128", "--no-desc-act", "--sym", "--damp", "0.1", "--dtype", "bfloat16"]


def make_inputs(work: Path, layers: int, nsamples: int, seqlen: int) -> tuple[Path, Path]:
    model, examples = work / f"llama-{layers}L", work / f"examples-{nsamples}x{seqlen}.safetensors"
    if not model.exists():
        run_child([sys.executable, "-c", MAKE_INPUTS, str(model), str(layers), str(examples), str(nsamples), str(seqlen)])
    return model, examples


def run_quantpress(model: Path, examples: Path, out: Path, nsamples: int, true_sequential: bool = True) -> ChildRun:
    return run_child([sys.executable, "-c", QUANTPRESS, str(model), str(out), str(examples), str(nsamples),
                      str(int(true_sequential))])


def run_peer(python: str, script: Path, model: Path, examples: Path, out: Path) -> ChildRun:
    shutil.rmtree(out, ignore_errors=True)  # a previous run's output
    # scratch cwd: GPTQModel writes ./logs/ into it
    return run_child([python, str(script), str(model), str(out), *SETTINGS, "--examples", str(examples)],
                     cwd=out.parent, env={"GPTQMODEL_CPU_WORKERS": "2"})


def mib(run: ChildRun) -> str:
    return f"{run.peak_rss_mib:.0f}"


def peer_table(args, work: Path) -> str:
    model, examples = make_inputs(work, 8, 128, 512)
    runs = {"quantpress": run_quantpress(model, examples, work / "q-quantpress", 128)}
    peers = {"GPTQModel 7.7.0": (args.gptqmodel_python, REPO / "tests/peers/gptqmodel_quantize.py"),
             "llm-compressor 0.14.0.1": (args.llmcompressor_python, REPO / "bench/peers/llmcompressor_quantize.py")}
    for name, (python, script) in peers.items():
        if not python:
            raise SystemExit(f"no interpreter for {name}: see --help")
        runs[name] = run_peer(python, script, model, examples, work / f"q-{name.split()[0]}")
        print(f"{name}: {runs[name].result}", flush=True)
    # llm-compressor calibrates each layer in one pass (true_sequential off); the same for us:
    one_pass = "quantpress, one pass per layer (true_sequential=False, as llm-compressor)"
    runs[one_pass] = run_quantpress(model, examples, work / "q-quantpress-one-pass", 128, true_sequential=False)
    ours = runs["quantpress"]
    rows = [[name, f"{r.result['quantize_seconds']:.1f}", f"{r.wall_s:.1f}", mib(r),
             f"{ours.result['quantize_seconds'] / r.result['quantize_seconds']:.2f}", f"{ours.peak_rss_mib / r.peak_rss_mib:.2f}"]
            for name, r in runs.items()]
    peers_only = [r for n, r in runs.items() if not n.startswith("quantpress")]
    fastest = min(peers_only, key=lambda r: r.result["quantize_seconds"])
    smallest = min(peers_only, key=lambda r: r.peak_rss_mib)
    summary = (f"quantpress / fastest peer, quantize time: **{ours.result['quantize_seconds'] / fastest.result['quantize_seconds']:.2f}**"
               f" (whole process {ours.wall_s / fastest.wall_s:.2f}); quantpress / smallest peer, peak RSS: "
               f"**{ours.peak_rss_mib / smallest.peak_rss_mib:.2f}**.")
    return (table(["tool", "quantize (s)", "whole process (s)", "peak RSS (MiB)", "quantpress time ÷ this",
                   "quantpress RSS ÷ this"], rows) + "\n\n" + summary)


def scaling_table(work: Path, layer_counts: list[int], sample_counts: list[int]) -> str:
    rows = []
    for layers in layer_counts:
        model, examples = make_inputs(work, layers, max(sample_counts), 512)
        for n in (sample_counts if layers == 8 else [max(sample_counts)]):
            run = run_quantpress(model, examples, work / f"scale-{layers}-{n}", n)
            rows.append([layers, n, f"{run.result['quantize_seconds']:.1f}", f"{run.wall_s:.1f}", mib(run)])
            print(rows[-1], flush=True)
    return table(["layers", "samples × 512 tokens", "quantize (s)", "whole process (s)", "peak RSS (MiB)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gptqmodel-python", default=os.environ.get("QUANTPRESS_PEER_GPTQMODEL_PYTHON"))
    parser.add_argument("--llmcompressor-python", default=os.environ.get("QUANTPRESS_PEER_LLMCOMPRESSOR_PYTHON"))
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--work", type=Path, default=None, help="keep models and outputs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        header = f"`{command_line()}`\n\n{machine()}.\n\n"
        if not args.skip_peers:
            body = header + peer_table(args, work)
            print(body, flush=True)
            write_section("speed-peers", body)
        if not args.skip_scaling:
            body = header + scaling_table(work, args.layers, args.samples)
            print(body)
            write_section("speed-scaling", body)


if __name__ == "__main__":
    main()
