"""CPU inference side by side (issue 13): quantpress dense bf16, quantpress's pre-issue-13 GPTQ
runtime (dequantized once, kept dense fp32), the packed runtime (fp32 and bf16 compute),
GPTQModel 7.7 on the same GPTQ folder, and llama.cpp at Q4_0 and Q4_K_M.

    python bench/cpu_runtime.py                        # SmolLM2-135M-Instruct and the 168M Llama
    python bench/cpu_runtime.py --models smollm2 --section cpu-runtime

Every row is a fresh process with the same thread count. Models: SmolLM2-135M-Instruct
(bench/real_model.py) and the random 168M Llama of bench/speed_memory.py, each quantized 4-bit
g128 sym with RTN (kernel speed does not depend on how the codes were chosen). Columns: resident
MiB the load added, peak RSS of the process, prefill tokens/s (one 512-token prompt), greedy decode
tokens/s with 1 and 16 concurrent streams (quantpress: its engine; GPTQModel: transformers'
generate, batched; llama.cpp: one sequence), the fraction of the machine's measured read
bandwidth the single-stream decode uses (weight bytes streamed per token x tokens/s), and
wikitext-2 perplexity (10 windows of 512; "kernel" rows send every row count through the decode
kernels, the others dequantize exactly at that length).

Peers: QUANTPRESS_PEER_GPTQMODEL_PYTHON (tests/peers/install_gptqmodel.sh) and
QUANTPRESS_PEER_LLAMACPP_PYTHON (bench/peers/install_llamacpp.sh, whose converter folder
QUANTPRESS_LLAMACPP_CONVERTER names; the converter runs in this venv and needs `sentencepiece`);
a missing peer's rows are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, ChildRun, command_line, machine, run_child, table, write_section
from real_model import cache_dir, smollm2_dir
from speed_memory import make_inputs

CHILD = REPO / "bench" / "cpu_runtime_child.py"
PEERS = REPO / "bench" / "peers"
BANDWIDTH = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB, far past the caches
x.sum()
best = min((lambda t: (x.sum(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(json.dumps({"gb_s": x.numel() * 4 / best / 1e9}))
"""


QUANTIZE_RTN = r"""
import sys, quantpress
from quantpress import QuantConfig
quantpress.quantize(sys.argv[1], sys.argv[2], QuantConfig(bits=4, group_size=128, sym=True, method="rtn"), None)
"""


def quantized(fp: Path, out: Path) -> Path:
    if not (out / "quantize_config.json").exists():
        run_child([sys.executable, "-c", QUANTIZE_RTN, str(fp), str(out)])
    return out


def models(names: list[str]) -> dict[str, tuple[Path, Path]]:
    work = cache_dir() / "cpu-runtime"
    found = {}
    for name in names:
        fp = smollm2_dir() if name == "smollm2" else make_inputs(work, 8, 8, 64)[0]
        found[name] = fp, quantized(fp, work / f"{name}-rtn-4bit-128g")
    return found


def quantpress_rows(fp: Path, gptq: Path, threads: int) -> list[tuple[str, ChildRun]]:
    runs = [("quantpress dense bf16", [fp, "dense-bf16"]), ("quantpress before #13 (dense fp32 cache)",
            [gptq, "baseline"]), ("quantpress packed, fp32 compute", [gptq, "packed"]),
            ("quantpress packed, bf16 compute", [gptq, "packed-bf16"]),
            ("quantpress packed, fp32, kernel at every length", [gptq, "packed", "--kernel-only"])]
    done = []
    for label, (path, variant, *rest) in runs:
        done.append((label, run_child([sys.executable, str(CHILD), variant, str(path), "--threads", str(threads),
                                       *rest])))
        print(label, done[-1][1].result, flush=True)
    return done


def gguf_files(fp: Path, peer: str, converter: Path, threads: int) -> dict[str, Path]:
    f16 = fp.parent / f"{fp.name}.F16.gguf"
    if not f16.exists():
        env = {"PYTHONPATH": str(converter / "gguf-py"), "NO_LOCAL_GGUF": ""}
        run_child([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(fp), "--outtype", "f16",
                   "--outfile", str(f16)], env=env)
    files = {}
    for kind in ("Q4_0", "Q4_K_M"):
        files[kind] = fp.parent / f"{fp.name}.{kind}.gguf"
        if not files[kind].exists():
            run_child([peer, str(PEERS / "llamacpp_runtime.py"), "quantize", str(f16), str(files[kind]), kind,
                       "--threads", str(threads)])
    return files


GPTQMODEL_BACKENDS = ("auto", "gptq_torch_cpu_avx512", "gptq_torch_aten", "gptq_torch")  # best first


def peer_rows(fp: Path, gptq: Path, threads: int, notes: list[str]) -> list[tuple[str, ChildRun]]:
    rows = []
    gptqmodel = os.environ.get("QUANTPRESS_PEER_GPTQMODEL_PYTHON")
    for backend in GPTQMODEL_BACKENDS if gptqmodel else ():
        try:  # the first backend that loads and runs this folder
            rows.append((f"GPTQModel 7.7 ({backend})", run_child(
                [gptqmodel, str(PEERS / "gptqmodel_runtime.py"), str(gptq), "--backend", backend,
                 "--threads", str(threads)])))
            break
        except SystemExit as failure:
            notes.append(f"GPTQModel backend `{backend}` failed on {gptq.name} ({failure.code.split(':')[0]})")
    llamacpp = os.environ.get("QUANTPRESS_PEER_LLAMACPP_PYTHON")
    converter = os.environ.get("QUANTPRESS_LLAMACPP_CONVERTER")
    if llamacpp and converter:
        try:
            files = gguf_files(fp, llamacpp, Path(converter), threads)
        except SystemExit:  # e.g. a tokenizer whose pre-tokenizer hash llama.cpp does not know
            notes.append(f"llama.cpp's converter refused {fp.name} (see stderr): no llama.cpp rows")
            files = {}
        for kind, path in files.items():
            rows.append((f"llama.cpp {kind}", run_child(
                [llamacpp, str(PEERS / "llamacpp_runtime.py"), "measure", str(path), "--threads", str(threads)])))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=["smollm2", "llama168m"], default=["smollm2", "llama168m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--section", help="write the tables into BENCHMARKS.md under this name")
    args = p.parse_args()
    gb_s = run_child([sys.executable, "-c", BANDWIDTH, str(args.threads)]).result["gb_s"]
    header = ["variant", "load MiB", "peak RSS MiB", "prefill tok/s", "decode tok/s (1)", "decode tok/s (16)",
              "of bandwidth", "perplexity"]
    body = [f"Measured read bandwidth: {gb_s:.1f} GB/s ({args.threads} threads).\n"]
    for name, (fp, gptq) in models(args.models).items():
        rows, notes = [], []
        for label, run in quantpress_rows(fp, gptq, args.threads) + peer_rows(fp, gptq, args.threads, notes):
            r = run.result
            share = f"{r['decode_tok_s_1'] * r['stream_bytes'] / 1e9 / gb_s:.0%}"
            rows.append([label, f"{r['loaded_mib']:.0f}", f"{run.peak_rss_mib:.0f}", f"{r['prefill_tok_s']:.0f}",
                         f"{r['decode_tok_s_1']:.1f}",
                         f"{r['decode_tok_s_16']:.0f}" if "decode_tok_s_16" in r else "—", share,
                         f"{r['perplexity']:.3f}" if "perplexity" in r else "—"])
        body.append(f"**{name}** ({fp.name}, GPTQ 4-bit g128 sym):\n\n" + table(header, rows) + "\n")
        body += [f"- {note}" for note in notes] + ([""] if notes else [])
        text = "\n".join(body) + f"\n{machine()}\n\n`{command_line()}`\n"
        print(text, flush=True)
        if args.section:  # after each model, so a later failure keeps what was measured
            write_section(args.section, text)


if __name__ == "__main__":
    main()
