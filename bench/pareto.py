"""Perplexity against size on disk for every quantpress variant of a model, RTN and GPTQ, plotted
so the Pareto front is visible.

    python bench/pareto.py --model /path/to/small-mistral      # writes bench/pareto-<model>.png

Variants: bits 2/3/4/8 x group size none/128/32 (8-bit: none/128), each as RTN and as GPTQ
act-order (damp 0.1, 128 wikitext-2 valid windows at the model's context, seed 0). Sizes are
the bytes of the variant's weight files; perplexity is wikitext-2 test at the model's context.
matplotlib is a quantpress dependency (the model card plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matplotlib
from _common import REPO, command_line, machine, table, write_section

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

import quantpress
from quantpress import CalibrationConfig, Method, QuantConfig
from quantpress.api import default_seqlen

GRID = [(2, 128), (2, 32), (3, -1), (3, 128), (3, 32), (4, -1), (4, 128), (4, 32), (8, -1), (8, 128)]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats in both size and perplexity, by size."""
    front, best = [], float("inf")
    for size, ppl in sorted(points):
        if ppl < best:
            front.append((size, ppl))
            best = ppl
    return front


def plot(path: Path, model_name: str, fp: tuple[float, float], rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for method, marker, color in (("RTN", "s", "tab:orange"), ("GPTQ", "o", "tab:blue")):
        pts = [(r["size_mib"], r["ppl"]) for r in rows if r["method"] == method]
        ax.scatter(*zip(*pts), marker=marker, color=color, label=method, zorder=3)
        for r in (r for r in rows if r["method"] == method):
            ax.annotate(r["label"], (r["size_mib"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(r["size_mib"], r["ppl"]) for r in rows] + [fp])
    ax.plot(*zip(*front), color="gray", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    ax.scatter([fp[0]], [fp[1]], marker="*", s=120, color="black", label="bf16 original", zorder=3)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("wikitext-2 test perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"{model_name}: quantpress variants, perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: bench/pareto-<model>.png)")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="evaluate on the first N test windows only (default: the whole split)")
    args = parser.parse_args()
    name = args.model.name
    png = args.out or REPO / "bench" / f"pareto-{name}.png"
    seqlen = default_seqlen(json.loads((args.model / "config.json").read_text()))
    def ppl(folder: Path) -> float:
        return quantpress.evaluate(folder, seqlen=seqlen, max_windows=args.eval_windows).perplexity

    fp = ppl(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits, group in GRID:
            for method in (Method.RTN, Method.GPTQ):
                gptq = method is Method.GPTQ
                quant = QuantConfig(bits=bits, group_size=group, act_order=gptq, method=method)
                calib = CalibrationConfig(nsamples=args.nsamples, seqlen=seqlen) if gptq else None
                report = quantpress.quantize(args.model, Path(tmp) / quantpress.variant_name(quant), quant, calib)
                label = f"{bits}b " + ("g-1" if group == -1 else f"g{group}")
                rows.append({"label": label, "method": "GPTQ" if gptq else "RTN", "ppl": ppl(report.out_dir),
                             "size_mib": report.size_bytes / 2**20, "seconds": report.seconds})
                print(rows[-1], flush=True)
    fp_point = (weight_bytes(args.model) / 2**20, fp)
    plot(png, name, fp_point, rows)
    on_front = set(pareto_front([(r["size_mib"], r["ppl"]) for r in rows] + [fp_point]))
    cells = [[r["label"], r["method"], f"{r['size_mib']:.2f}", f"{r['ppl']:.2f}", f"{r['ppl'] / fp - 1:+.2%}",
              "yes" if (r["size_mib"], r["ppl"]) in on_front else "", f"{r['seconds']:.0f}"] for r in rows]
    body = (f"`{command_line()}`\n\n{machine()}. Model `{name}`, full precision (bf16, "
            f"{fp_point[0]:.1f} MiB) perplexity {fp:.2f} at seqlen {seqlen} "
            f"({'the first ' + str(args.eval_windows) if args.eval_windows else 'all'} test windows). "
            "GPTQ rows use act-order.\n\n"
            f"![perplexity vs size]({png.relative_to(REPO)})\n\n"
            + table(["variant", "method", "size (MiB)", "ppl", "vs fp", "on Pareto front", "quantize (s)"], cells))
    print(body)
    write_section(f"pareto-{name}", body)


if __name__ == "__main__":
    main()
