"""Smoke test of the peer runners on the bundled tiny-llama — run with the PROJECT venv.

    python bench/peers/smoke_tiny.py --gptqmodel-python /work/peer/gm/bin/python \
        --llmc-python /work/peer/llmc/bin/python [--work DIR] [--max-windows 40]

One set of 16 x 512 wikitext-2 calibration windows goes to quantpress and to both peers (each in
its own venv, as a subprocess), at 4-bit g128 without act-order and 3-bit g128 with act-order.
Every output is evaluated here by quantpress (the llm-compressor one through its dense export),
and the dense export is loaded by transformers too, which must give the logits quantpress gives.
Prints a markdown table. Timings are only indicative: the runs are niced and this machine is
shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import quantpress
from quantpress import CalibrationConfig, QuantConfig
from quantpress.calibration import calibration_examples

HERE = Path(__file__).resolve().parent
GPTQMODEL_RUNNER = HERE.parents[1] / "tests" / "peers" / "gptqmodel_quantize.py"  # the interop tests' runner
NSAMPLES, SEQLEN = 16, 512
# (label, bits, group_size, act_order)
SETTINGS = [("4-bit g128", 4, 128, False), ("3-bit g128 act-order", 3, 128, True)]


def run_peer(python: str, script: Path, args: list[str]) -> dict:
    """Run a runner in its venv from a scratch cwd (GPTQModel writes ./logs/); its last JSON line."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="qp_peer_cwd_") as cwd:
        proc = subprocess.run(["nice", "-n", "19", python, str(script), *args],
                              cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def check_plain_model(dense: Path, ids: torch.Tensor) -> float:
    """The dense export must load as a plain model in transformers and in quantpress, identically."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    qp = quantpress.load(dense)
    assert qp.format_info is None, "dense export still declares quantization"
    with torch.inference_mode():
        a = hf(input_ids=ids, use_cache=False).logits
        b = qp.model(input_ids=ids, use_cache=False).logits
    return (a - b).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gptqmodel-python", default="/work/peer/gm/bin/python")
    p.add_argument("--llmc-python", default="/work/peer/llmc/bin/python")
    p.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    p.add_argument("--max-windows", type=int, default=40)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qp_peer_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    src = quantpress.bundled_model_dir()
    source = quantpress.load(src)
    ids = calibration_examples(source.tokenizer, CalibrationConfig(nsamples=NSAMPLES, seqlen=SEQLEN))
    calib = work / "calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(calib))

    def ppl(model_dir: Path) -> float:
        return quantpress.evaluate(model_dir, max_windows=args.max_windows).perplexity

    fp = quantpress.evaluate(source, max_windows=args.max_windows).perplexity
    rows = [("fp (bf16 source)", "-", f"{fp:.2f}", "", "")]
    for label, bits, group, act in SETTINGS:
        tag = f"{bits}b_g{group}{'_act' if act else ''}"
        flags = ["--bits", str(bits), "--group-size", str(group), "--desc-act" if act else "--no-desc-act",
                 "--sym", "--damp", "0.1", "--examples", str(calib), "--dtype", "float32"]
        for static in (False, True):
            out = work / f"qp_{tag}{'_static' if static else ''}"
            report = quantpress.quantize(src, out, QuantConfig(bits=bits, group_size=group, act_order=act,
                                                               static_groups=static),
                                         CalibrationConfig(nsamples=NSAMPLES, seqlen=SEQLEN), examples=ids,
                                         overwrite=True)
            rows.append((label, f"quantpress{' static_groups' if static else ''}", f"{ppl(out):.2f}",
                         f"{report.seconds:.1f} (whole run)", ""))
        for static in (False, True):
            out = work / f"gm_{tag}{'_static' if static else ''}"
            r = run_peer(args.gptqmodel_python, GPTQMODEL_RUNNER,
                         [str(src), str(out), *flags, *(["--static-groups"] if static else [])])
            rows.append((label, f"GPTQModel {r['version']}{' static_groups' if static else ''}",
                         f"{ppl(out):.2f}", f"{r['quantize_seconds']:.1f}", f"{r['vm_hwm_mib']:.0f}"))
        for ts in (False, True):
            out = work / f"llmc_{tag}{'_ts' if ts else ''}"
            dense = out.with_name(out.name + "_dense")
            r = run_peer(args.llmc_python, HERE / "llmcompressor_quantize.py",
                         [str(src), str(out), *flags, "--dense-out", str(dense), "--verify",
                          *(["--true-sequential"] if ts else [])])
            diff = check_plain_model(dense, ids[:2])
            assert diff <= 1e-4, f"{dense}: transformers and quantpress logits differ by {diff}"
            rows.append((label, f"llm-compressor {r['version']}{' --true-sequential' if ts else ''}",
                         f"{ppl(dense):.2f}", f"{r['quantize_seconds']:.1f}", f"{r['vm_hwm_mib']:.0f}"))
    print(f"\ntiny-llama, calibration wikitext2 {NSAMPLES}x{SEQLEN}, eval wikitext2 test "
          f"{args.max_windows}x{SEQLEN} (quantpress.evaluate), outputs in {work}\n")
    print("| setting | tool | ppl | quantize s | peak RSS (VmHWM) MiB |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
