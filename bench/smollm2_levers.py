"""Issue 12's quality levers on SmolLM2-135M-Instruct, each alone and combined, against full
precision, RTN and the peers, from identical calibration windows.

    python bench/smollm2_levers.py --bits 4 --group-size 128                  # every variant
    python bench/smollm2_levers.py --variants gptq gar combo --section levers-4bit
    python bench/smollm2_levers.py --variants --peers "GPTQModel defaults" AutoRound

Peers run in their own virtualenvs (bench/peers/README.md), found through
QUANTPRESS_PEER_GPTQMODEL_PYTHON, QUANTPRESS_PEER_LLMCOMPRESSOR_PYTHON and
QUANTPRESS_PEER_AUTOROUND_PYTHON; each gets the same calibration tensor file and is judged by
the same evaluation child as quantpress (llm-compressor through its dense fp32 export).

Protocol (issue 12): calibration 128 x 512 tokens of wikitext-2 valid (seed 0), sym, damp 0.1
unless the lever changes it; wikitext-2 test perplexity on the first 40 non-overlapping
512-token windows; KL divergence and top-1 agreement to full precision on wikitext-2 test
rendered as conversations in SmolLM2's own chat template (first 20 windows of 512). Quantize time
and peak RSS come from a child process per variant (the parent imports no torch, so the child's
ru_maxrss is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, machine, run_child, table, write_section
from real_model import cache_dir, smollm2_dir

# name -> QuantConfig fields on top of the base setting (bits/group size from the command line)
VARIANTS: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "gptq": {},
    "mse": {"mse": True},
    "mse-weighted": {"mse": True, "mse_weighted": True},
    "static-act-order": {"act_order": True, "static_groups": True},
    "gar": {"group_aware": True},
    "damp-search": {"damp_search": True},
    "upgrade-2pct": {"upgrade_budget": 0.02},
    "combo": {"group_aware": True, "mse": True, "mse_weighted": True, "damp_search": True},
    # static act-order measured better than GAR alone on SmolLM2 4-bit (+21.1% vs +25.7%)
    "combo-static": {"act_order": True, "static_groups": True, "mse": True, "mse_weighted": True,
                     "damp_search": True},
    # the combination without the damp search, which solves every module four times
    "static+mse-weighted": {"act_order": True, "static_groups": True, "mse": True, "mse_weighted": True},
    "combo-static+upgrade": {"act_order": True, "static_groups": True, "mse": True, "mse_weighted": True,
                             "damp_search": True, "upgrade_budget": 0.02},
    # GPTQ with the combination, then SignRound per layer against the full-precision outputs
    "signround": {"method": "signround", "act_order": True, "static_groups": True, "mse": True,
                  "mse_weighted": True, "damp_search": True},
    "signround+upgrade": {"method": "signround", "act_order": True, "static_groups": True, "mse": True,
                          "mse_weighted": True, "damp_search": True, "upgrade_budget": 0.02},
    # 50 steps per layer: the cost of AutoRound's `light` recipe, for a like-for-like row
    "signround-50": {"method": "signround", "act_order": True, "static_groups": True, "mse": True,
                     "mse_weighted": True, "damp_search": True, "signround_iters": 50},
}

# name -> (tool, runner flags beyond bits / group size / sym / examples / dtype)
PEERS: dict[str, tuple[str, list[str]]] = {
    "GPTQModel classic": ("gptqmodel", ["--no-desc-act", "--damp", "0.1"]),
    "GPTQModel defaults": ("gptqmodel", ["--own-defaults"]),
    # static act-order + importance-weighted range search, llm-compressor's own damping (0.01)
    "llm-compressor static+imatrix": ("llmcompressor", ["--desc-act", "--observer", "imatrix_mse", "--damp", "0.01"]),
    "AutoRound": ("autoround", ["--recipe", "default"]),
    "AutoRound best": ("autoround", ["--recipe", "best"]),
    "AutoRound light": ("autoround", ["--recipe", "light"]),
}
RUNNERS = {"gptqmodel": "tests/peers/gptqmodel_quantize.py", "llmcompressor": "bench/peers/llmcompressor_quantize.py",
           "autoround": "bench/peers/autoround_quantize.py"}
PYTHONS = {"gptqmodel": "QUANTPRESS_PEER_GPTQMODEL_PYTHON", "llmcompressor": "QUANTPRESS_PEER_LLMCOMPRESSOR_PYTHON",
           "autoround": "QUANTPRESS_PEER_AUTOROUND_PYTHON"}


def child_prepare(model: Path, work: Path, seed: int, nsamples: int, seqlen: int) -> None:
    """The calibration windows, saved once so every variant sees the same tensor."""
    import torch
    from safetensors.torch import save_file

    from quantpress import CalibrationConfig
    from quantpress.calibration import calibration_examples
    from quantpress.formats.hf_folder import load_tokenizer

    path = work / f"examples-seed{seed}-{nsamples}x{seqlen}.safetensors"
    if not path.exists():
        ids = calibration_examples(load_tokenizer(model), CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=seed))
        save_file({"input_ids": ids.contiguous()}, str(path))
    print(json.dumps({"examples": str(path), "threads": torch.get_num_threads()}))


def child_quantize(model: Path, out: Path, examples: Path, fields: dict, seed: int) -> None:
    from safetensors.torch import load_file

    import quantpress
    from quantpress import CalibrationConfig, QuantConfig

    ids = load_file(str(examples))["input_ids"]
    quant = QuantConfig(**fields)
    calibration = None if quant.method.value == "rtn" else CalibrationConfig(nsamples=len(ids), seqlen=ids.shape[1],
                                                                            seed=seed)
    report = quantpress.quantize(model, out, quant, calibration, examples=None if calibration is None else ids,
                                 overwrite=True)
    print(json.dumps({"seconds": report.seconds, "size_bytes": report.size_bytes}))


def child_eval(folder: Path, reference: Path, ppl_windows: int, kl_windows: int, seqlen: int) -> None:
    import quantpress
    from quantpress import api

    loaded = quantpress.load(folder)
    ppl = quantpress.evaluate(loaded, seqlen=seqlen, max_windows=ppl_windows).perplexity
    result = {"perplexity": ppl}
    if folder != reference:
        agreement = api.compare(loaded, reference, seqlen=seqlen, max_windows=kl_windows)
        result |= {"kl": agreement.kl_divergence, "top1": agreement.top1}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--peers", nargs="*", default=[], choices=list(PEERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--kl-windows", type=int, default=20)
    parser.add_argument("--section", default=None, help="write the table into BENCHMARKS.md under this name")
    parser.add_argument("--plot", type=Path, default=None,
                        help="only draw perplexity vs size from every result recorded so far into this PNG")
    parser.add_argument("--report", action="store_true",
                        help="only print (and with --section write) one table of every result recorded so far "
                             "for --bits/--group-size: each variant's latest run per seed, seeds pooled")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_as_child(args)

    model, work = smollm2_dir(), cache_dir() / "levers"
    work.mkdir(parents=True, exist_ok=True)
    if args.plot:
        return plot(work / "results.jsonl", args.plot)
    if args.report:
        return report(work / "results.jsonl", args)
    me = [sys.executable, __file__]
    shape = ["--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples), "--seed", str(args.seed),
             "--ppl-windows", str(args.ppl_windows), "--kl-windows", str(args.kl_windows)]
    examples = run_child([*me, *shape, "--child", "prepare", str(model), str(work)]).result["examples"]
    fp = run_child([*me, *shape, "--child", "eval", str(model), str(model)]).result
    size_fp = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    rows = [["full precision (bf16)", f"{fp['perplexity']:.2f}", "—", "0", "100%", f"{size_fp / 2**20:.0f}", "", ""]]
    print(rows[-1], flush=True)
    for name in args.variants:
        fields = {"bits": args.bits, "group_size": args.group_size, **VARIANTS[name]}
        out = work / f"{name}-{args.bits}b-g{args.group_size}-seed{args.seed}"
        q = run_child([*me, *shape, "--child", "quantize", str(model), str(out), examples, json.dumps(fields)])
        e = run_child([*me, *shape, "--child", "eval", str(out), str(model)]).result
        record(work / "results.jsonl", {"variant": name, "bits": args.bits, "group_size": args.group_size,
                                        "seed": args.seed, "fp_perplexity": fp["perplexity"], **e,
                                        "size_bytes": q.result["size_bytes"], "seconds": q.result["seconds"],
                                        "peak_rss_mib": q.peak_rss_mib})
        rows.append(row(name, fp, e, q.result["size_bytes"], q.result["seconds"], q.peak_rss_mib))
        print(rows[-1], flush=True)
    for name in args.peers:
        tool, flags = PEERS[name]
        python = os.environ.get(PYTHONS[tool])
        if not python:
            raise SystemExit(f"{name}: set {PYTHONS[tool]} to the python of its virtualenv (bench/peers/README.md)")
        out = work / f"{name.replace(' ', '_')}-{args.bits}b-g{args.group_size}-seed{args.seed}"
        judged = out.with_name(out.name + "-dense") if tool == "llmcompressor" else out
        extra = ["--dense-out", str(judged)] if tool == "llmcompressor" else []
        q = run_child([python, str(REPO / RUNNERS[tool]), str(model), str(out), "--bits", str(args.bits),
                       "--group-size", str(args.group_size), "--sym", "--examples", examples, "--dtype", "bfloat16",
                       *flags, *extra], cwd=work,
                      # GPTQModel refuses fewer than 2 workers (its loader pool takes 2); torch's own
                      # threads follow OMP_NUM_THREADS like every other child's
                      env={"GPTQMODEL_CPU_WORKERS": str(max(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))})
        e = run_child([*me, *shape, "--child", "eval", str(judged), str(model)]).result
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        # peak RSS: the runner's VmHWM (its own image; ru_maxrss would include the venv's launcher)
        rss = q.result.get("vm_hwm_mib") or q.peak_rss_mib
        record(work / "results.jsonl", {"variant": name, "bits": args.bits, "group_size": args.group_size,
                                        "seed": args.seed, "fp_perplexity": fp["perplexity"], **e, "size_bytes": size,
                                        "seconds": q.result["quantize_seconds"], "peak_rss_mib": rss,
                                        "peer": q.result})
        rows.append(row(name, fp, e, size, q.result["quantize_seconds"], rss))
        print(rows[-1], flush=True)
    body = (f"`{command_line()}`\n\n{machine()}. SmolLM2-135M-Instruct, {args.bits}-bit g{args.group_size} sym; "
            f"calibration {args.nsamples} × {args.seqlen} wikitext-2 valid tokens, seed {args.seed}; perplexity on "
            f"{args.ppl_windows} × {args.seqlen} wikitext-2 test tokens; KL / top-1 to full precision on "
            f"{args.kl_windows} × {args.seqlen} tokens of wikitext-2 test in SmolLM2's chat template.\n\n"
            + table(["variant", "perplexity", "vs fp", "KL (nats/token)", "top-1", "size MiB", "quantize s",
                     "peak RSS MiB"], rows))
    print(body)
    if args.section:
        write_section(args.section, body)


def row(name: str, fp: dict, e: dict, size: int, seconds: float, rss: float) -> list[str]:
    return [name, f"{e['perplexity']:.2f}", f"{e['perplexity'] / fp['perplexity'] - 1:+.1%}", f"{e['kl']:.4f}",
            f"{e['top1']:.1%}", f"{size / 2**20:.0f}", f"{seconds:.0f}", f"{rss:.0f}"]


def record(path: Path, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


def report(results: Path, args) -> None:
    """One table from the recorded runs: per variant, the mean over calibration seeds with the
    seeds' min-max perplexity, so a difference can be read against the spread."""
    import statistics

    latest: dict[tuple[str, int], dict] = {}  # (variant, seed) -> its last recorded run
    for line in results.read_text().splitlines():
        r = json.loads(line)
        if (r["bits"], r["group_size"]) == (args.bits, args.group_size):
            latest[(r["variant"], r["seed"])] = r
    variants = list(dict.fromkeys(v for v, _ in latest))
    fp = next(iter(latest.values()))["fp_perplexity"]
    rows = [["full precision (bf16)", f"{fp:.2f}", "", "—", "0", "100%", "", "", ""]]
    for name in variants:
        runs = [r for (v, _), r in sorted(latest.items()) if v == name]
        ppl = [r["perplexity"] for r in runs]
        spread = f"{min(ppl):.2f}–{max(ppl):.2f}" if len(runs) > 1 else ""

        def mean(key: str) -> float:
            return statistics.fmean(r[key] for r in runs)

        rows.append([name, f"{mean('perplexity'):.2f}", f"{spread} ({len(runs)})" if spread else "1 seed",
                     f"{mean('perplexity') / fp - 1:+.1%}", f"{mean('kl'):.4f}", f"{mean('top1'):.1%}",
                     f"{mean('size_bytes') / 2**20:.0f}", f"{mean('seconds'):.0f}", f"{mean('peak_rss_mib'):.0f}"])
    body = (f"`{command_line()}`: SmolLM2-135M-Instruct, {args.bits}-bit g{args.group_size} sym, every run recorded "
            f"in results.jsonl; perplexity is the mean over calibration seeds (min–max and count beside it).\n\n"
            + table(["variant", "perplexity", "seeds: min–max (n)", "vs fp", "KL (nats/token)", "top-1", "size MiB",
                     "quantize s", "peak RSS MiB"], rows))
    print(body)
    if args.section:
        write_section(args.section, body)


def plot(results: Path, png: Path) -> None:
    """Perplexity against size on disk, one marker per variant and bit width: the Pareto view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in sorted({r["variant"] for r in rows}):
        points = sorted((r["size_bytes"] / 2**20, r["perplexity"], r["bits"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=variant)
        for size, ppl, bits in points:
            ax.annotate(f"{bits}b", (size, ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(rows[0]["fp_perplexity"], color="gray", linestyle="--", label="full precision")
    ax.set_yscale("log")
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("wikitext-2 perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(png)


def run_as_child(args) -> None:
    kind, *rest = args.child
    if kind == "prepare":
        child_prepare(Path(rest[0]), Path(rest[1]), args.seed, args.nsamples, args.seqlen)
    elif kind == "quantize":
        child_quantize(Path(rest[0]), Path(rest[1]), Path(rest[2]), json.loads(rest[3]), args.seed)
    else:
        child_eval(Path(rest[0]), Path(rest[1]), args.ppl_windows, args.kl_windows, args.seqlen)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
