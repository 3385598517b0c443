"""wikitext-2 test perplexity of quantpress (RTN, GPTQ), GPTQModel and llm-compressor, side by side,
from identical calibration windows; then the spread over calibration seeds.

Every tool gets the same `[nsamples, seqlen]` token windows (sampled by quantpress from
wikitext-2 valid with the given seed and saved to one safetensors file) and loads the model in
bf16. Every output is evaluated by the same code, quantpress's paper-protocol perplexity on the
whole wikitext-2 test split: GPTQ folders directly, llm-compressor's compressed-tensors output
through the dense fp32 export its runner writes. Settings mapping and what cannot be matched:
bench/peers/README.md. llm-compressor always derives group grids from the original weight (static
groups) and has no g_idx act-order, and it runs with its default one calibration pass per layer
(not true-sequential: its emulation costs ~7x the calibration time and changed nothing measurable
in the smoke test, see the README).

    python bench/peers_quality.py                                  # the bundled model
    python bench/peers_quality.py --model DIR --section quality-small-mistral
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import REPO, command_line, machine, run_child, table, write_section
from safetensors.torch import save_file
from transformers import AutoTokenizer

import quantpress
from quantpress import CalibrationConfig, Method, QuantConfig
from quantpress.api import default_seqlen
from quantpress.calibration import calibration_examples


@dataclass(frozen=True)
class Setting:
    bits: int
    group_size: int
    act_order: bool = False

    @property
    def label(self) -> str:
        group = "g-1" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.bits}-bit {group}" + (" act-order" if self.act_order else "")

    def peer_flags(self) -> list[str]:
        return ["--bits", str(self.bits), "--group-size", str(self.group_size),
                "--desc-act" if self.act_order else "--no-desc-act", "--sym", "--damp", "0.1", "--dtype", "bfloat16"]


SETTINGS = [Setting(8, -1), Setting(4, 128), Setting(4, -1, True), Setting(4, 32, True), Setting(3, 128, True),
            Setting(2, 64)]
SEEDED = [Setting(4, 128), Setting(3, 128, True)]  # repeated over calibration seeds
TOOLS = ["quantpress", "GPTQModel", "llm-compressor"]


class Bench:
    def __init__(self, args, work: Path) -> None:
        self.args, self.work, self.model = args, work, args.model
        self.seqlen = args.seqlen or default_seqlen(json.loads((args.model / "config.json").read_text()))
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.ppl_cache: dict[Path, float] = {}

    def ppl(self, folder: Path) -> float:
        if folder not in self.ppl_cache:
            self.ppl_cache[folder] = quantpress.evaluate(folder, seqlen=self.seqlen).perplexity
        return self.ppl_cache[folder]

    def examples(self, seed: int) -> tuple[torch.Tensor, Path]:
        calib = CalibrationConfig(nsamples=self.args.nsamples, seqlen=self.seqlen, seed=seed)
        ids = calibration_examples(self.tokenizer, calib)
        path = self.work / f"examples-seed{seed}.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(path))
        return ids, path

    def run(self, tool: str, s: Setting, seed: int) -> float:
        out = self.work / f"{tool}-{s.bits}b-g{s.group_size}-act{int(s.act_order)}-seed{seed}"
        ids, path = self.examples(seed)
        if tool == "quantpress":
            quant = QuantConfig(bits=s.bits, group_size=s.group_size, act_order=s.act_order)
            calib = CalibrationConfig(nsamples=len(ids), seqlen=ids.shape[1], seed=seed)
            quantpress.quantize(self.model, out, quant, calib, examples=ids, overwrite=True)
            return self.ppl(out)
        if tool == "GPTQModel":
            run_child([self.args.gptqmodel_python, str(REPO / "tests/peers/gptqmodel_quantize.py"), str(self.model),
                       str(out), *s.peer_flags(), "--examples", str(path)], cwd=self.work,
                      env={"GPTQMODEL_CPU_WORKERS": "2"})
            return self.ppl(out)
        dense = out.with_name(out.name + "-dense")
        run_child([self.args.llmcompressor_python, str(REPO / "bench/peers/llmcompressor_quantize.py"), str(self.model),
                   str(out), *s.peer_flags(), "--examples", str(path), "--dense-out", str(dense)],
                  cwd=self.work)
        return self.ppl(dense)

    def rtn(self, s: Setting) -> float:
        out = self.work / f"rtn-{s.bits}b-g{s.group_size}"
        quantpress.quantize(self.model, out, QuantConfig(bits=s.bits, group_size=s.group_size, method=Method.RTN),
                            None, overwrite=True)
        return self.ppl(out)


def ratio_cell(ours: float, peers: list[float]) -> str:
    return f"{ours / min(peers):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=quantpress.bundled_model_dir())
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=None, help="calibration and evaluation window (default: model's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gptqmodel-python", default=os.environ.get("QUANTPRESS_PEER_GPTQMODEL_PYTHON"))
    parser.add_argument("--llmcompressor-python", default=os.environ.get("QUANTPRESS_PEER_LLMCOMPRESSOR_PYTHON"))
    parser.add_argument("--section", default="quality-bundled")
    args = parser.parse_args()
    if not (args.gptqmodel_python and args.llmcompressor_python):
        raise SystemExit("both peer interpreters are needed: see --help")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        fp = bench.ppl(args.model)
        rows = [["full precision", f"{fp:.2f}", "", "", "", "", ""]]
        results: dict[tuple[str, Setting, int], float] = {}
        for s in SETTINGS:
            for tool in TOOLS:
                results[tool, s, args.seeds[0]] = bench.run(tool, s, args.seeds[0])
            ours, peers = results["quantpress", s, args.seeds[0]], [results[t, s, args.seeds[0]] for t in TOOLS[1:]]
            rows.append([s.label, f"{bench.rtn(s):.2f}", f"{ours:.2f}", f"{peers[0]:.2f}", f"{peers[1]:.2f}",
                         ratio_cell(ours, peers), f"{ours / fp - 1:+.2%}"])
            print(rows[-1], flush=True)
        seed_rows = []
        for s in SEEDED:
            for seed in args.seeds[1:]:
                for tool in TOOLS:
                    results[tool, s, seed] = bench.run(tool, s, seed)
            cells, means = [s.label], {}
            for tool in TOOLS:
                values = [results[tool, s, seed] for seed in args.seeds]
                means[tool] = statistics.mean(values)
                cells.append(f"{means[tool]:.2f} ({min(values):.2f}–{max(values):.2f})")
            cells.append(ratio_cell(means["quantpress"], [means[t] for t in TOOLS[1:]]))
            seed_rows.append(cells)
            print(seed_rows[-1], flush=True)
    name = args.model.name
    body = (f"`{command_line()}`\n\n{machine()}. Model `{name}`; wikitext-2 test perplexity at seqlen {bench.seqlen}; "
            f"calibration {args.nsamples} × {bench.seqlen} tokens of wikitext-2 valid, seed {args.seeds[0]}, damp 0.1, sym, "
            "bf16 calibration in every tool.\n\n"
            + table(["setting", "RTN (quantpress)", "GPTQ quantpress", "GPTQModel", "llm-compressor",
                     "quantpress ÷ best peer", "quantpress vs fp"], rows)
            + f"\n\nMean (min–max) over calibration seeds {', '.join(map(str, args.seeds))}:\n\n"
            + table(["setting", *TOOLS, "quantpress ÷ best peer (means)"], seed_rows))
    print(body)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
