"""Quantize a local HF folder with llm-compressor's GPTQModifier — runs in the LLMC venv only.

    PEER_PY llmcompressor_quantize.py MODEL_DIR OUT_DIR --bits 4 --group-size 128 --no-desc-act \
        --sym --damp 0.1 --examples calib.safetensors --dtype float32 [--dense-out DIR] [--verify]

OUT_DIR gets llm-compressor's own output (compressed-tensors `pack-quantized`), which quantpress
does not read. `--dense-out` additionally writes a plain fp32 model holding exactly
scale * (q - zero) for every quantized Linear, decoded here from OUT_DIR's packed tensors (not
through compressed-tensors), so quantpress evaluates what llm-compressor wrote. `--verify` checks
that decode against the weights GPTQ left in memory and against compressed-tensors' own
decompression (transformers.from_pretrained(OUT_DIR)); any mismatch exits non-zero.
The last stdout line is JSON: quantize_seconds (oneshot() only), peak_rss_mib (ru_maxrss through
the save of OUT_DIR, before the dense export; exec inherits the parent's high-water mark into it),
vm_hwm_mib (VmHWM at the same point, not inherited), tool, version.

Settings, as read in llm-compressor 0.14.0.1 / compressed-tensors 0.19.0 source:
- Act-order: `actorder="weight"` (alias "static") for --desc-act, None otherwise. "group" (the
  old g_idx-permuted grouping, i.e. GPTQ desc_act=True + static_groups=False) was REMOVED:
  QuantizationArgs' validator raises for "group"/"dynamic"/True. So classic act-order cannot be
  reproduced. "weight" permutes columns by descending diag(H) during GPTQ only; every column keeps
  its natural group k // group_size (no g_idx is saved), which is GPTQ desc_act=True with
  static_groups=True (quantpress QuantConfig(act_order=True, static_groups=True)).
- Group scales/zeros: in EVERY mode GPTQModifier takes them from a min-max observer run on the
  original weight before the GPTQ loop (on_sequential_epoch_end: observe() then
  quantize_weight(scale=...)); classic GPTQ (static_groups=False) recomputes each group's grid
  from the error-updated weights when the loop reaches it. So without act-order, too, the
  equivalent quantpress setting is static_groups=True. Per-channel (--group-size -1) has one grid
  per row from the original weight in both, so it matches classic GPTQ.
- Calibration windows: a datasets.Dataset with an `input_ids` column is used as is (no
  tokenization; llmcompressor/datasets/utils.py get_processed_dataset). shuffle_calibration_samples
  defaults to True (RandomSampler!) and is turned off; the non-shuffling LengthAwareSampler then
  orders by an unstable argsort of lengths, which for 128 equal-length windows does permute them
  (only the fp32 summation order of the Hessians changes). A pre-hook on the input embedding
  records the ids of the calibration pass and the run fails unless they are exactly the given
  windows.
- Within a decoder layer all Linears are calibrated in one pass on the unquantized layer (true
  sequential off). --true-sequential sets sequential_targets=["Linear"] so that each Linear is its
  own pipeline stage and o_proj/down_proj see quantized q/k/v and gate/up outputs, as in classic
  true_sequential. Not a documented use of sequential_targets; checked on tiny-llama (layer-0
  q/k/v identical to the default run, o_proj onwards differ), ~7x slower calibration.
- max_seq_length=seqlen only bounds the truncating collator (windows are seqlen long, batch 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "peers"))
from runner_common import load_windows, vm_hwm_mib  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, required=True, help="-1: one grid per output row")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, required=True)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--damp", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--observer", default="memoryless_minmax",
                   help="weight observer: memoryless_minmax (default), mse, or imatrix_mse (range search "
                        "weighted by each input channel's mean square)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=False,
                   help="one pipeline stage per Linear (see docstring); default: per decoder layer")
    p.add_argument("--examples", required=True, help="safetensors file with int64 input_ids [n, seqlen]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the source is loaded and calibrated in (fp16 matmul on CPU is ~50x slower)")
    p.add_argument("--dense-out", help="also write a dequantized fp32 folder here")
    p.add_argument("--verify", action="store_true", help="check the dense decode (needs --dense-out)")
    args = p.parse_args(argv)
    if args.sym is None:
        p.error("pass --sym or --asym")
    if args.verify and not args.dense_out:
        p.error("--verify checks the dense export: pass --dense-out")
    return args


def build_modifier(args: argparse.Namespace):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    actorder = "weight" if args.desc_act else None
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=args.sym,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
        actorder=actorder, observer=args.observer,
    )
    # actorder is also given to the modifier: its default is a "static" sentinel that would
    # otherwise turn act-order on for a scheme whose actorder is None.
    return GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], dampening_frac=args.damp, actorder=actorder, block_size=args.block_size,
    )


class WindowRecorder:
    """Pre-hook on the input embedding: keeps the real (non-traced) input_ids it is called with."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[Tensor] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and type(x) is Tensor and x.device.type != "meta":
            self.seen.append(x.detach().clone())

    def check(self, ids: Tensor) -> None:
        """The calibration pass (the first len(ids) rows) must hold exactly the given windows.
        Their order may differ: with 128 equal-length windows llm-compressor's unstable length
        sort permutes them, which changes only the fp32 summation order of its Hessians."""
        self.handle.remove()
        rows = [tuple(r.tolist()) for t in self.seen for r in t.reshape(-1, t.shape[-1])]
        if sorted(rows[: len(ids)]) != sorted(tuple(r) for r in ids.tolist()):
            raise SystemExit(f"llm-compressor did not calibrate on the given windows "
                             f"({len(rows)} rows seen for {len(ids)} windows)")


def quantize(args: argparse.Namespace, ids: Tensor) -> tuple[torch.nn.Module, object, float]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recorder = WindowRecorder(model.get_input_embeddings())
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=tokenizer, recipe=build_modifier(args), dataset=dataset,
        num_calibration_samples=len(ids), max_seq_length=ids.shape[1], batch_size=1,
        shuffle_calibration_samples=False, pipeline="sequential",
        sequential_targets=["Linear"] if args.true_sequential else None,
    )
    seconds = time.perf_counter() - start
    recorder.check(ids)
    return model, tokenizer, seconds


# ------------------------------------------------------------------------------------------------
# Dense export: an independent decoder of compressed-tensors pack-quantized (no compressed_tensors
# import), so the dense folder is checked against, not derived from, llm-compressor's own code.


def unpack_rows(words: Tensor, bits: int, count: int, chunk: int = 256) -> Tensor:
    """int32 [R, W] -> int64 [R, count]: each row is one LSB-first bitstream of `bits`-bit values."""
    out = []
    shifts = torch.arange(32)
    for w in words.split(chunk):
        w = w.to(torch.int64) & 0xFFFFFFFF  # the stored uint32 bit pattern
        stream = ((w[:, :, None] >> shifts) & 1).reshape(len(w), -1)[:, : count * bits]
        out.append((stream.reshape(len(w), count, bits) << torch.arange(bits)).sum(-1))
    return torch.cat(out)


def dequantize_checkpoint(out_dir: Path) -> tuple[dict[str, Tensor], dict, list[str]]:
    """fp32 state dict with scale * (q - zero) for every packed weight; config; quantized names."""
    config = json.loads((out_dir / "config.json").read_text())
    qc = config["quantization_config"]
    groups = list(qc["config_groups"].values())
    if qc.get("format") != "pack-quantized" or len(groups) != 1:
        raise SystemExit(f"unexpected quantization_config: format {qc.get('format')}, {len(groups)} groups")
    wargs = groups[0]["weights"]
    bits, offset = int(wargs["num_bits"]), 1 << (int(wargs["num_bits"]) - 1)  # stored = q + offset
    tensors: dict[str, Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    state = {k: v.float() for k, v in tensors.items()
             if not any(k.startswith(n + ".weight_") for n in names)}
    for n in names:
        rows, cols = (int(v) for v in tensors[f"{n}.weight_shape"])
        q = unpack_rows(tensors[f"{n}.weight_packed"], bits, cols) - offset  # [N, K] signed
        scale = tensors[f"{n}.weight_scale"].float()  # [N, G]
        zp = torch.zeros_like(scale, dtype=torch.int64)
        if f"{n}.weight_zero_point" in tensors:  # asym: packed along the output dim
            zp = unpack_rows(tensors[f"{n}.weight_zero_point"].t().contiguous(), bits, rows).t() - offset
        if f"{n}.weight_g_idx" in tensors:
            g_idx = tensors[f"{n}.weight_g_idx"].long()
        else:
            g_idx = torch.arange(cols) // (cols // scale.shape[1])  # natural groups (1 for channel)
        state[f"{n}.weight"] = scale[:, g_idx] * (q - zp[:, g_idx]).float()
    return state, config, names


def write_dense(out_dir: Path, dense_dir: Path, model_dir: Path) -> tuple[dict[str, Tensor], list[str]]:
    state, config, names = dequantize_checkpoint(out_dir)
    config.pop("quantization_config")
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    dense_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dense_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (dense_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:  # from OUT_DIR (llm-compressor re-saves them), else the source
        src = out_dir / name if (out_dir / name).exists() else model_dir / name
        if src.exists():
            shutil.copy2(src, dense_dir / name)
    return state, names


def verify(state: dict[str, Tensor], names: list[str], in_memory: dict[str, Tensor], out_dir: Path) -> dict:
    """Dense decode == GPTQ's in-memory result == compressed-tensors' decompression, bit for bit
    (after rounding the exact fp32 decode to the dtype each side holds)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    def compare(other: dict[str, Tensor], what: str) -> None:
        bad = [n for n in names if not torch.equal(state[f"{n}.weight"].to(other[n].dtype), other[n])]
        if bad:
            d = (state[f"{bad[0]}.weight"] - other[bad[0]].float()).abs().max().item()
            raise SystemExit(f"dense export differs from {what} in {len(bad)} modules ({bad[0]}: {d})")

    compare(in_memory, "GPTQ's in-memory weights")
    # dequantize=True: decompress at load time (the default keeps weight_packed until a forward)
    loaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    modules = dict(loaded.named_modules())
    if any(type(modules[n]) is not torch.nn.Linear for n in names):
        raise SystemExit("transformers did not decompress OUT_DIR to nn.Linear")
    compare({n: modules[n].weight.detach() for n in names}, "compressed-tensors' decompression")
    return {"verified_modules": len(names), "dtype_in_memory": str(next(iter(in_memory.values())).dtype)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import llmcompressor

    ids = load_windows(args.examples)
    model, tokenizer, seconds = quantize(args, ids)
    in_memory = {}
    if args.verify:  # snapshot before save: compression may touch the modules in place
        in_memory = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if getattr(m, "quantization_scheme", None) is not None}
    model.save_pretrained(args.out_dir, save_compressed=True)
    tokenizer.save_pretrained(args.out_dir)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hwm_mib = vm_hwm_mib()
    extra: dict = {}
    if args.dense_out:
        del model
        state, names = write_dense(Path(args.out_dir), Path(args.dense_out), Path(args.model_dir))
        if args.verify:
            if set(in_memory) != set(names):
                raise SystemExit(f"quantized modules {sorted(in_memory)} != packed tensors {names}")
            extra = verify(state, names, in_memory, Path(args.out_dir))
    print(json.dumps({
        "quantize_seconds": round(seconds, 2),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "vm_hwm_mib": hwm_mib,
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "true_sequential": args.true_sequential,
        **extra,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
