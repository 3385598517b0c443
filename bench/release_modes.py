"""Sequential vs shared calibration on the default 7-variant recipe: time and perplexity.

    python bench/release_modes.py --model /work/bench-models/small-mistral --seeds 0 1 2 --eval-windows 128
    python bench/release_modes.py --model ... --variants lowbit     # 2-bit g32/g128 and 3-bit no group

Each (mode, seed) is one `quantpress release` child process writing a fresh repository, with the
default recipe (TheBloke's set, all act-order, damp 0.1, 128 wikitext-2 windows) at calibration
seed `seed`. Sequential mode quantizes every variant with its own pass (each layer's Hessians
from the already-quantized layers before it); shared mode runs one full-precision pass for all
seven. Times come from the release's own records: the quantize step per variant (shared: the one
pass, split evenly) and the evaluation. The modes of one seed run back to back, so their time
ratio is measured side by side; the perplexity spread over seeds says which differences are real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, machine, run_child, table, write_section

MODES = {"sequential": [], "shared": ["--shared-calibration"]}
# (bits, group size, main): the default recipe (quantpress.release.recipe.default_recipe), and a
# low-bit set where small models react enough to quantization for a difference between the modes
# to show above the seed spread.
VARIANT_SETS = {
    "default": [(4, -1, True), (4, 128, False), (4, 32, False), (3, 128, False), (3, 32, False), (8, -1, False),
                (8, 128, False)],
    "lowbit": [(2, 32, True), (2, 128, False), (3, -1, False)],
}


def recipe_yaml(seed: int, rows: list[tuple[int, int, bool]]) -> str:
    """A recipe of `rows`, all act-order, damp 0.1, wikitext-2, at calibration seed `seed`."""
    return yaml.safe_dump({
        "model": {"name": "bench", "creator": "bench", "original_model": "bench"},
        "defaults": {"act_order": True, "damp_percent": 0.1, "dataset": "wikitext2", "seed": seed},
        "variants": [{"main": main, "bits": b, "group_size": g} for b, g, main in rows],
    })


def run_release(model: str, mode: str, seed: int, rows, eval_windows: int | None, work: Path) -> dict:
    repo = work / f"{mode}-seed{seed}"
    recipe = work / f"recipe-seed{seed}.yaml"
    recipe.write_text(recipe_yaml(seed, rows))
    argv = [sys.executable, "-m", "quantpress.cli", "release", model, str(repo), "--recipe", str(recipe),
            *MODES[mode], *(["--eval-windows", str(eval_windows)] if eval_windows else [])]
    child = run_child(argv, cwd=REPO)
    state = repo / ".git" / "quantpress"
    results = {p.stem: json.loads(p.read_text()) for p in (state / "results").glob("*.json")}
    quantize_s = sum(json.loads((state / "variants" / f"{b}.done.json").read_text())["seconds"] for b in results)
    baseline = json.loads((state / "baseline.json").read_text())["baseline"]
    return {"wall_s": child.wall_s, "rss_mib": child.peak_rss_mib, "quantize_s": quantize_s,
            "eval_s": sum(r["eval_seconds"] for r in results.values()), "fp_ppl": baseline["perplexity"],
            "ppl": {b: r["perplexity"] for b, r in results.items()}}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "src/quantpress/assets/models/tiny-llama"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--variants", choices=sorted(VARIANT_SETS), default="default")
    args = parser.parse_args()

    runs: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="qp-release-bench-") as tmp:
        for seed in args.seeds:
            for mode in MODES:
                runs[mode, seed] = run_release(args.model, mode, seed, VARIANT_SETS[args.variants], args.eval_windows,
                                               Path(tmp))
                r = runs[mode, seed]
                print(f"{mode} seed {seed}: quantize {r['quantize_s']:.1f} s, wall {r['wall_s']:.1f} s", flush=True)

    first = args.seeds[0]
    seq, sh = runs["sequential", first], runs["shared", first]
    n = len(VARIANT_SETS[args.variants])
    timing = table(["mode", f"quantize {n} variants (s)", f"evaluate {n} variants (s)", "whole release (s)", "peak RSS (MiB)"], [
        [mode, f"{r['quantize_s']:.1f}", f"{r['eval_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['rss_mib']:.0f}"]
        for mode, r in (("sequential", seq), ("shared", sh))])
    branches = list(seq["ppl"])
    branches.sort(key=lambda b: b != "main")
    quality = table(["branch", "sequential ppl", "shared ppl", "shared − sequential (mean)"], [
        [f"`{b}`", spread([runs["sequential", s]["ppl"][b] for s in args.seeds]),
         spread([runs["shared", s]["ppl"][b] for s in args.seeds]),
         f"{statistics.mean(runs['shared', s]['ppl'][b] - runs['sequential', s]['ppl'][b] for s in args.seeds):+.3f}"]
        for b in branches])
    windows = f"the first {args.eval_windows} windows" if args.eval_windows else "all windows"
    body = "\n\n".join([
        f"`{command_line()}`", f"Machine: {machine()}",
        (f"Model `{Path(args.model).name}`, full-precision wikitext-2 test perplexity {seq['fp_ppl']:.3f} "
         f"({windows} of the model's context). Time of seed {first}; quantize time ratio shared/sequential = "
         f"**{sh['quantize_s'] / seq['quantize_s']:.2f}**."),
        timing,
        f"Perplexity, mean (min–max) over calibration seeds {', '.join(map(str, args.seeds))}:",
        quality,
    ])
    print(body)
    write_section("release-modes" if args.variants == "default" else f"release-modes-{args.variants}", body)


if __name__ == "__main__":
    main()
