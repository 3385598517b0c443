"""Where quantpress's quantization time goes, phase by phase, with the FLOP rate each achieves.

Runs `quantpress.quantize` under cProfile in a child process and splits its wall time into
phases by the functions that implement them; each phase's FLOPs are counted from the model
shape, and its rate is compared with this machine's measured GEMM rate in the dtype it runs in.

    python bench/profile_quantize.py --model /path/to/llama-168m --nsamples 128 --seqlen 512
    python bench/profile_quantize.py --src /tmp/before/src ...   # profile another checkout

cProfile adds a few percent to the Python-heavy GPTQ column loop; the total without the
profiler is in bench/speed_memory.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, machine, run_child, table, write_section

CHILD = r"""
import cProfile, json, pstats, shutil, sys, tempfile, time
import torch
import quantpress
from quantpress import CalibrationConfig, QuantConfig
model, nsamples, seqlen, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def gemm_rate(dt, m=4096, k=1024, n=2816):
    a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
    a @ b
    t = time.perf_counter()
    for _ in range(5): a @ b
    return 2 * m * k * n * 5 / (time.perf_counter() - t)

rates = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
torch.manual_seed(0)
examples = torch.randint(0, 32000, (nsamples, seqlen))
calib = CalibrationConfig(nsamples=nsamples, seqlen=seqlen)
if dtype != "float32-legacy":  # checkouts before compute_dtype existed always ran fp32
    calib = CalibrationConfig(nsamples=nsamples, seqlen=seqlen, compute_dtype=dtype)
out = tempfile.mkdtemp()
profile = cProfile.Profile()
profile.enable()
quantpress.quantize(model, out + "/q", QuantConfig(bits=4, group_size=128), calib, examples=examples)
profile.disable()
shutil.rmtree(out)
cum = {}
for (file, _, func), (_, _, _, ct, _) in pstats.Stats(profile).stats.items():
    key = file.rsplit("/", 1)[-1] + ":" + func
    cum[key] = cum.get(key, 0.0) + ct
print(json.dumps({"cum": cum, "rates": rates}))
"""

# phase -> the functions whose cumulative time it is (file:function); forward passes for the
# Hessians are collect_hessians minus the accumulation it calls
PHASES = {
    "capture layer-0 inputs": ["layerwise.py:capture_layer_inputs"],
    "Hessian accumulation": ["gptq.py:add_batch"],
    "forward passes (Hessian stages)": ["layerwise.py:collect_hessians"],
    "forward passes (propagation)": ["layerwise.py:forward_layer", "layerwise.py:forward_layer_"],
    "GPTQ solve": ["gptq.py:gptq_quantize"],
    "packing": ["gptq_tensors.py:to_gptq_tensors"],
    "I/O: read weights": ["hf_folder.py:read"],
    "I/O: write safetensors": ["hf_folder.py:stream_safetensors"],
}


BLOCKWISE = "layerwise.py:quantize_layer_blockwise"
BLOCKWISE_PHASE = "forward passes (blockwise stages + propagation)"


def phase_seconds(cum: dict[str, float]) -> dict[str, float]:
    def total(keys):  # a phase named twice (old/new function names) counts whichever exists
        return max((cum.get(k, 0.0) for k in keys), default=0.0)

    seconds = {phase: total(keys) for phase, keys in PHASES.items()}
    seconds["forward passes (Hessian stages)"] -= seconds["Hessian accumulation"]
    if BLOCKWISE in cum:  # stages and propagation interleave there: one phase, net of what it calls
        del seconds["forward passes (Hessian stages)"], seconds["forward passes (propagation)"]
        seconds[BLOCKWISE_PHASE] = (cum[BLOCKWISE] - cum["gptq.py:add_batch"]
                                    - cum["layerwise.py:quantize_group"])
    seconds["other (imports, config, Python)"] = cum["pipeline.py:quantize"] - sum(seconds.values())
    return seconds


def phase_flops(config: dict, n: int, T: int) -> dict[str, float]:
    """FLOPs of each phase for a Llama-like model at 4-bit g128, true-sequential."""
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * h // config["num_attention_heads"]
    tokens = n * T
    qkv, o, gate_up, down = h * (h + 2 * kv), h * h, 2 * h * i, i * h  # Linear parameter counts
    attention = 4 * T * T * h * n  # QK^T and AV of one layer over all windows
    # stage s runs the layer up to group s: q/k/v run in the o, gate/up and down stages, etc.
    stages = 2 * tokens * (3 * qkv + 2 * o + gate_up) + 3 * attention
    propagate = (2 * tokens * (qkv + o + gate_up + down) + attention) * (L - 1) / L
    hessian = 2 * tokens * (3 * h * h + i * i)  # one K x K per input group: q/k/v, o, gate/up, down
    solve = sum(N * K * K + K**3 for N, K in [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)])
    # blockwise: q/k/v + attention once (the o stage; o_proj's inputs are cached for the
    # propagation), o once, gate/up in the down stage and again in the propagation, down once
    blockwise = 2 * tokens * (qkv + o + 2 * gate_up + down) + attention
    return {"Hessian accumulation": L * hessian, "forward passes (Hessian stages)": L * stages,
            "forward passes (propagation)": L * propagate, "GPTQ solve": L * solve, BLOCKWISE_PHASE: L * blockwise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Llama-like HF folder (bench/speed_memory.py makes one)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--compute-dtype", default="bfloat16",
                        help="bfloat16 | float32 | float32-legacy (a checkout without compute_dtype)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="quantpress source tree to profile")
    parser.add_argument("--label", default="current")
    parser.add_argument("--section", default=None, help="write the table into BENCHMARKS.md under this name")
    args = parser.parse_args()

    run = run_child([sys.executable, "-c", CHILD, str(args.model), str(args.nsamples), str(args.seqlen),
                     args.compute_dtype], env={"PYTHONPATH": str(args.src)})
    cum, rates = run.result["cum"], run.result["rates"]
    config = json.loads((args.model / "config.json").read_text())
    seconds = phase_seconds(cum)
    flops = phase_flops(config, args.nsamples, args.seqlen)
    fwd_dtype = "float32" if args.compute_dtype.startswith("float32") else "bfloat16"
    # Hessian GEMMs run on bf16 units when the activations are bf16 (exact, see quant/gptq.py)
    runs_in = {"Hessian accumulation": fwd_dtype, "forward passes (Hessian stages)": fwd_dtype,
               "forward passes (propagation)": fwd_dtype, BLOCKWISE_PHASE: fwd_dtype, "GPTQ solve": "float32"}
    total = cum["pipeline.py:quantize"]
    rows = []
    for phase, s in seconds.items():
        row = [phase, f"{s:.1f}", f"{s / total:.0%}"]
        if phase in flops:
            rate = flops[phase] / s / 1e9
            row += [f"{flops[phase] / 1e12:.2f}", f"{rate:.0f}", f"{rate * 1e9 / rates[runs_in[phase]]:.0%} of {runs_in[phase]}"]
        else:
            row += ["", "", ""]
        rows.append(row)
    rows.append(["**total**", f"**{total:.1f}**", "100%", "", "", ""])
    body = (f"{args.label}: `{command_line()}`\n\n{machine()}; measured GEMM rate (4096x1024 @ 1024x2816): "
            f"fp32 {rates['float32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s.\n\n"
            + table(["phase", "seconds", "share", "TFLOP", "GFLOP/s", "of the GEMM rate"], rows))
    print(body)
    if args.section:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
