"""Quantize a local HF folder with AutoRound (intel/auto-round, SignRound) — runs in the AR venv only.

    PEER_PY autoround_quantize.py MODEL_DIR OUT_DIR --bits 4 --group-size 128 --sym \
        --examples calib.safetensors --dtype bfloat16 --recipe default [--iters N] [--seed S] [--verify]

OUT_DIR gets AutoRound's `auto_gptq` export (GPTQ v1 packing: qweight/qzeros/scales/g_idx,
quantize_config.json), which quantpress reads. The last stdout line is JSON: tool, version,
quantize_seconds (AutoRound's `quantize()` only: block-input caching, SignRound tuning and the
per-block packing it does in place; not load, not save), peak_rss_mib (ru_maxrss after saving OUT;
exec inherits the parent's high-water mark into it), vm_hwm_mib (VmHWM at the same point, not
inherited), and the settings AutoRound actually resolved (iters, lr, minmax_lr, batch size, ...).

Settings, as read in auto-round 0.16.1 source:
- API: `AutoRound(model, tokenizer, scheme="W4A16", alg_configs=SignRoundConfig(...), dataset=...,
  nsamples=, seqlen=, batch_size=, ...)` then `quantize_and_save(dir, format="auto_gptq")`, as the
  CLI does (cli/main.py `tune`; bits/group_size/sym go into the SignRoundConfig, which overrides the
  W4A16 preset). quantize_and_save writes into `dir/<model name>-w{bits}g{gs}`, so the runner saves
  into a staging folder and moves that folder's files up into OUT_DIR.
- Recipes (cli/main.py RECIPES; the `auto-round`, `auto-round-best`, `auto-round-light` commands):
  default iters 200, lr None; best iters 1000, lr None; light iters 50, lr 5e-3; all batch_size 8.
  nsamples/seqlen of the recipes (128/512 x 2048) are NOT taken: the calibration windows are ours.
  lr None resolves in SignRoundConfig._lr_for_bits to 1/iters, or 2/iters when iters >= 1000 and
  bits <= 3; minmax_lr None falls back to lr. `--iters` overrides the recipe's iters (lr stays as
  the recipe says, as with `auto-round-light --iters N`). Everything else at AutoRound's defaults:
  SignSGD, momentum 0, minmax tuning on, quantized inputs from the previous block, best-loss
  restore, linear lr decay, gradient_accumulate_steps 1, nblocks 1, lm_head not quantized.
- Calibration windows: `dataset` is a list of {"input_ids": [1, L], "attention_mask": ones [1, L]},
  one per window. A non-string dataset is iterated as is (calibration/llm.py LLMCalibrator.calib):
  no tokenization, no shuffling, no truncation (windows shorter than seqlen would be SKIPPED, so
  seqlen = L), and it stops after nsamples = n windows. A pre-hook on the input embedding records
  the ids of the caching pass, and the run fails unless they are exactly the given windows, in
  order. (A tensor entry without attention_mask would get a mask derived from pad_token_id with
  the last position zeroed; the dict's all-ones mask is used as given.)
- Tuning batch: every iteration draws batch_size (8) of the n cached windows at random (seeded).
- Loss mask: AutoRound caches the ids with -100 at pad_token_id positions and at the LAST position
  of every window, and leaves those positions out of the block-output MSE (as it does for its own
  pile-10k data). The JSON reports how many positions were masked besides the last ones.
- dtype: `--dtype bfloat16` loads bf16 and keeps AutoRound's amp (bf16 autocast; AutoRound's own
  default on a CPU with avx512_bf16/AMX, and it CASTS an fp32 model to bf16 there); `--dtype
  float32` loads fp32 and passes amp=False, the only way to tune in fp32 on such a CPU.
- Memory: low_cpu_mem_usage defaults to False here (AutoRound's default is True). With True and a
  single packable format, AutoRound also writes each packed block to OUT during `quantize()`
  ("immediate saving") and offloads blocks to $AR_WORK_SPACE, so quantize_seconds would include
  saving; `--low-cpu-mem-usage` restores the default for memory rows.
- Forced: CPU (CUDA_VISIBLE_DEVICES="", device_map="cpu"), enable_torch_compile=False,
  trust_remote_code=False, HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/HF_DATASETS_OFFLINE=1, and
  AR_WORK_SPACE in a temporary folder (AutoRound's default is ./ar_work_space in the cwd).
- `--verify`: the weight AutoRound leaves in each Linear just before packing (its own q-dq result)
  must equal, bit for bit after rounding to that dtype, an independent decode of OUT's tensors
  (GPTQ v1: W[:, k] = scales[g_idx[k]] * (q[k] - (qzeros[g_idx[k]] + 1))).
"""

from __future__ import annotations

import os
import tempfile

# Before torch / transformers / auto_round are imported.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORK_SPACE = None
if "AR_WORK_SPACE" not in os.environ:
    _WORK_SPACE = tempfile.mkdtemp(prefix="ar_work_space_")
    os.environ["AR_WORK_SPACE"] = _WORK_SPACE

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "peers"))
from runner_common import load_windows, vm_hwm_mib  # noqa: E402

# cli/main.py RECIPES (auto-round 0.16.1), minus seqlen/nsamples: the windows are the caller's.
RECIPES = {
    "default": {"iters": 200, "lr": None, "batch_size": 8},
    "best": {"iters": 1000, "lr": None, "batch_size": 8},
    "light": {"iters": 50, "lr": 5e-3, "batch_size": 8},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, required=True, help="-1: one grid per output row")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--examples", required=True, help="safetensors file with int64 input_ids [n, seqlen]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], required=True,
                   help="load and tuning dtype (bfloat16: AutoRound's amp default on CPU; float32: amp off)")
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--iters", type=int, help="override the recipe's iters (>= 1)")
    p.add_argument("--seed", type=int, default=42, help="AutoRound's seed (its default 42)")
    p.add_argument("--low-cpu-mem-usage", action=argparse.BooleanOptionalAction, default=False,
                   help="AutoRound's default True: block offload + immediate saving inside quantize()")
    p.add_argument("--verify", action="store_true",
                   help="check OUT's packed tensors against AutoRound's in-memory q-dq weights")
    args = p.parse_args(argv)
    if args.sym is None:
        p.error("pass --sym or --asym")
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be >= 1 (0 selects AutoRound's RTN path, not SignRound)")
    return args


class WindowRecorder:
    """Pre-hook on the input embedding: keeps the input_ids it is called with."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[Tensor] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.device.type != "meta":
            self.seen.append(x.detach().clone())

    def check(self, ids: Tensor) -> int:
        """The caching pass (AutoRound's only full-model forward) must hold exactly the given windows,
        in order. Returns how many rows the embedding saw in all."""
        self.handle.remove()
        rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in self.seen]) if self.seen else ids[:0]
        if rows.shape[1:] != ids.shape[1:] or len(rows) < len(ids) or not torch.equal(rows[: len(ids)], ids):
            raise SystemExit(f"AutoRound did not calibrate on the given windows "
                             f"({tuple(rows.shape)} rows seen for {tuple(ids.shape)} windows)")
        return len(rows)


class CacheProbe:
    """Wraps LLMCalibrator.cache_inter_data to read the token ids AutoRound caches for its loss mask
    (-100 = position left out of the block-output MSE)."""

    def __init__(self) -> None:
        from auto_round.calibration.llm import LLMCalibrator

        self.cls = LLMCalibrator
        self.orig = LLMCalibrator.cache_inter_data
        self.cached_ids: list[Tensor] | None = None
        probe = self

        def wrapped(calibrator, *a, **kw):
            res = probe.orig(calibrator, *a, **kw)
            if isinstance(res, dict) and isinstance(res.get("input_ids"), list):
                probe.cached_ids = [t.clone() for t in res["input_ids"]]
            return res

        LLMCalibrator.cache_inter_data = wrapped

    def restore(self) -> None:
        self.cls.cache_inter_data = self.orig

    def check(self, ids: Tensor) -> dict:
        if self.cached_ids is None:
            raise SystemExit("AutoRound cached no input_ids (calibration path changed?)")
        cached = torch.cat(self.cached_ids)
        if cached.shape != ids.shape:
            raise SystemExit(f"AutoRound cached {tuple(cached.shape)} ids for {tuple(ids.shape)} windows")
        masked = cached == -100
        if not torch.equal(cached[~masked], ids[~masked]):
            raise SystemExit("AutoRound's cached ids differ from the given windows")
        return {"loss_masked_positions": int(masked.sum()),
                "loss_masked_besides_last": int(masked[:, :-1].sum())}


class PackProbe:
    """Snapshots each Linear's weight (AutoRound's q-dq result) just before auto_gptq packing."""

    def __init__(self) -> None:
        import auto_round.export.export_to_autogptq.export as gptq_export
        from auto_round.utils import get_module

        self.mod = gptq_export
        self.orig = gptq_export.pack_layer
        self.qdq: dict[str, Tensor] = {}
        probe = self

        def wrapped(name, model, *a, **kw):
            layer = get_module(model, name)
            if type(layer) is torch.nn.Linear and getattr(layer, "bits", 16) <= 8:
                probe.qdq[name] = layer.weight.detach().to("cpu").clone()
            return probe.orig(name, model, *a, **kw)

        gptq_export.pack_layer = wrapped

    def restore(self) -> None:
        self.mod.pack_layer = self.orig


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """int32 [R, W] -> int64 [R, W * 32 // bits]: each word holds 32 // bits values, LSB first.
    (2/4/8 bits; 3-bit GPTQ straddles words and is decoded by unpack_3bit.)"""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits)
    return ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(len(w), -1)


def unpack_3bit(words: Tensor) -> Tensor:
    """int32 [R, 3 * W] (packed along dim 0 for qweight after .t()) -> values; GPTQ's 3-bit layout
    packs 32 values into each run of 3 words as one 96-bit LSB-first stream."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # [R, 3W]
    r, c = w.shape
    w = w.reshape(r, c // 3, 3)
    stream = ((w[:, :, :, None] >> torch.arange(32)) & 1).reshape(r, c // 3, 96)
    vals = (stream.reshape(r, c // 3, 32, 3) << torch.arange(3)).sum(-1)
    return vals.reshape(r, -1)


def decode_gptq(out_dir: Path, bits: int) -> dict[str, Tensor]:
    """fp32 W [N, K] for every packed module in OUT_DIR (GPTQ v1, zeros stored minus one)."""
    tensors: dict[str, Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    unpack = unpack_3bit if bits == 3 else (lambda t: unpack_rows(t, bits))
    out = {}
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        n = key[: -len(".qweight")]
        scales = tensors[f"{n}.scales"].float()  # [G, N]
        g_idx = tensors[f"{n}.g_idx"].long()  # [K]
        k = len(g_idx)
        q = unpack(tensors[f"{n}.qweight"].t().contiguous()).t()[:k]  # packed along K -> [K, N]
        z = unpack(tensors[f"{n}.qzeros"])[:, : scales.shape[1]] + 1  # [G, N]
        out[n] = (scales[g_idx] * (q - z[g_idx]).float()).t()
    return out


def verify(out_dir: Path, qdq: dict[str, Tensor], bits: int) -> dict:
    decoded = decode_gptq(out_dir, bits)
    if set(decoded) != set(qdq):
        raise SystemExit(f"packed modules {sorted(decoded)} != modules AutoRound packed {sorted(qdq)}")
    bad = [n for n in decoded if not torch.equal(decoded[n].to(qdq[n].dtype), qdq[n])]
    if bad:
        d = (decoded[bad[0]] - qdq[bad[0]].float()).abs().max().item()
        raise SystemExit(f"OUT differs from AutoRound's q-dq weights in {len(bad)} modules ({bad[0]}: {d})")
    return {"verified_modules": len(decoded), "dtype_in_memory": str(next(iter(qdq.values())).dtype)}


def move_up(folder: Path, out_dir: Path) -> None:
    for item in folder.iterdir():
        target = out_dir / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(item), str(target))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import auto_round
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = dict(RECIPES[args.recipe])
    if args.iters is not None:
        recipe["iters"] = args.iters
    ids = load_windows(args.examples)
    n, seqlen = ids.shape
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ar_staging_", dir=out_dir))

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype),
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=False)
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    rows = [{"input_ids": r[None, :].clone(), "attention_mask": torch.ones_like(r)[None, :]} for r in ids]
    recorder = WindowRecorder(model.get_input_embeddings())
    cache_probe = CacheProbe()
    pack_probe = PackProbe()

    config = SignRoundConfig(iters=recipe["iters"], lr=recipe["lr"],
                             bits=args.bits, group_size=args.group_size, sym=args.sym, data_type="int")
    ar = AutoRound(
        model, tokenizer=tokenizer, scheme="W4A16", alg_configs=config,
        dataset=rows, nsamples=n, seqlen=seqlen, batch_size=recipe["batch_size"],
        device_map="cpu", enable_torch_compile=False, seed=args.seed,
        low_cpu_mem_usage=args.low_cpu_mem_usage, amp=args.dtype == "bfloat16",
        trust_remote_code=False,
    )
    timing = {}
    orig_quantize = ar.quantize

    def timed_quantize(*a, **kw):
        start = time.perf_counter()
        try:
            return orig_quantize(*a, **kw)
        finally:
            timing["quantize_seconds"] = time.perf_counter() - start

    ar.quantize = timed_quantize  # quantize_and_save calls self.quantize()
    _, folders = ar.quantize_and_save(str(staging), format="auto_gptq")
    folders = [Path(f) for f in (folders if isinstance(folders, (list, tuple)) else [folders])]
    if len(folders) != 1 or not (folders[0] / "config.json").exists():
        raise SystemExit(f"unexpected export folders {folders}")
    move_up(folders[0], out_dir)
    shutil.rmtree(staging)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hwm_mib = vm_hwm_mib()

    seen_rows = recorder.check(ids)
    cache_probe.restore()
    pack_probe.restore()
    mask_info = cache_probe.check(ids)

    qc = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    want = {"quant_method": "gptq", "bits": args.bits, "group_size": args.group_size, "sym": args.sym}
    got = {k: qc.get(k) for k in want}
    if got != want:
        raise SystemExit(f"AutoRound wrote quantization_config {got}, asked for {want}")
    extra: dict = {}
    if args.verify:
        extra = verify(out_dir, pack_probe.qdq, args.bits)
    qcfg = ar.quantize_config
    print(json.dumps({
        "tool": "auto-round",
        "version": auto_round.__version__,
        "quantize_seconds": round(timing["quantize_seconds"], 2),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "vm_hwm_mib": hwm_mib,
        "recipe": args.recipe,
        "iters": qcfg.iters,
        "lr": qcfg.lr,
        "minmax_lr": qcfg.minmax_lr,
        "batch_size": ar.calibration_context.batch_size,
        "nsamples": n,
        "seqlen": seqlen,
        "seed": args.seed,
        "dtype": args.dtype,
        "amp": args.dtype == "bfloat16",
        "low_cpu_mem_usage": args.low_cpu_mem_usage,
        "packed_modules": len(pack_probe.qdq),
        "unquantized_linears": sorted(set(linears) - set(pack_probe.qdq)),
        "embedding_rows_seen": seen_rows,
        **mask_info,
        **extra,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        if _WORK_SPACE is not None:
            shutil.rmtree(_WORK_SPACE, ignore_errors=True)
