"""Quantize a local HF folder with GPTQModel (classic GPTQ) — runs in the PEER venv only.

    GPTQMODEL_CPU_WORKERS=2 PEER_PY gptqmodel_quantize.py MODEL_DIR OUT_DIR \
        --bits 4 --group-size 32 --desc-act --sym --format gptq --damp 0.1 \
        --examples calib.safetensors

`--examples` holds one `[n, seqlen]` int64 tensor `input_ids`; the caller hands the same windows to
quantpress, so the two tools see identical calibration data. Settings are pinned to the classic
algorithm (spec B): act_group_aware off (GPTQModel's default "GAR" reorders groups), mse 0,
static_groups off (unless --static-groups), no rotation, no GPTAQ/FOEM, RTN fallback off, fp32
Hessian staging.

Run it from a scratch directory: GPTQModel writes `./logs/` into the cwd. quantpress never imports
this file; the test suite runs it through `subprocess` with the peer interpreter, and the peer
benchmarks (bench/) the same way.

The last stdout line is JSON. `quantize_seconds` times `model.quantize()` alone (calibration
forwards, GPTQ, packing), not load or save; `seconds` is load + quantize + save; `peak_rss_mib` is
this process's peak RSS (ru_maxrss) after the save, which includes the parent's high-water mark
when the parent was bigger; `vm_hwm_mib` (VmHWM) does not. `tool`/`version` name the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Must be set before gptqmodel is imported: on a 2-core box its default worker count asks the
# 'cpu' device pool for 2 workers while the parent pool has 1, and quantize() aborts.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from runner_common import load_windows, vm_hwm_mib  # noqa: E402  (this folder: sys.path[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--own-defaults", action="store_true",
                   help="GPTQModel's own defaults for everything but bits/group size/sym/format (act-order, "
                        "GAR, damp, fallback): the settings a new user gets; the JSON line reports them")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--format", choices=["gptq", "gptq_v2"], default="gptq")
    p.add_argument("--damp", type=float, default=0.1)
    # Off (the classic algorithm) unless asked: the benches turn it on to match llm-compressor,
    # which always takes group grids from the pre-GPTQ weight (see bench/peers/README.md).
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
    # Off unless asked (the interop fixtures pin classic GPTQ); GPTQModel's own default is on.
    p.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--examples", required=True, help="safetensors file with int64 input_ids [n, seqlen]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype GPTQModel loads the source in (fp16 matmul on CPU is ~50x slower)")
    args = p.parse_args(argv)
    if args.sym is None:
        p.error("pass --sym or --asym")
    if (args.desc_act is None) != args.own_defaults:
        p.error("pass exactly one of --desc-act/--no-desc-act and --own-defaults")
    return args


def calibration_rows(path: str) -> list[dict[str, torch.Tensor]]:
    """GPTQModel's calibration format: one dict per sequence, with an all-ones attention mask."""
    ids = load_windows(path)
    return [{"input_ids": row[None, :], "attention_mask": torch.ones_like(row)[None, :]} for row in ids]


def classic_config(args: argparse.Namespace, QuantizeConfig):
    """Classic GPTQ, every setting pinned (the interop fixtures and like-for-like benches)."""
    return QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=args.sym,
        format=args.format,
        damp_percent=args.damp,
        act_group_aware=args.act_group_aware,
        static_groups=args.static_groups,
        mse=0.0,
        true_sequential=True,
        fallback=None,  # default Fallback() silently RTN-quantizes modules it deems under-calibrated
        device="cpu",  # with device in the config, GPTQModel.load must get no device= argument
        # Default True stages layers in a random /tmp/gptqmodel_* dir and records that path in
        # the saved config.json, which would make every regenerated fixture differ textually.
        offload_to_disk=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gptqmodel import GPTQModel, QuantizeConfig, __version__

    if args.own_defaults:
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, format=args.format,
                              device="cpu", offload_to_disk=False)
    else:
        qcfg = classic_config(args, QuantizeConfig)
    start = time.perf_counter()
    model = GPTQModel.load(args.model_dir, qcfg, dtype=getattr(torch, args.dtype))
    rows = calibration_rows(args.examples)
    # calibration_sort=None keeps the caller's order (the default "desc" sorts by length; ours
    # are equal-length, but an unstable sort could still permute them and change H's rounding).
    quantize_start = time.perf_counter()
    model.quantize(rows, batch_size=1, calibration_sort=None)
    quantize_seconds = time.perf_counter() - quantize_start
    model.save(args.out_dir)
    print(json.dumps({
        "gptqmodel": __version__,
        "seconds": round(time.perf_counter() - start, 1),
        "out_dir": args.out_dir,
        "quantize_seconds": round(quantize_seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "vm_hwm_mib": vm_hwm_mib(),
        "tool": "GPTQModel",
        "version": __version__,
        "settings": {k: str(getattr(qcfg, k, None)) for k in ("desc_act", "act_group_aware", "damp_percent",
                                                             "static_groups", "mse", "fallback")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
