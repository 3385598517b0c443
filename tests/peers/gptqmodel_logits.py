"""Logits of a GPTQ folder loaded the way a transformers user loads it — runs in the PEER venv only.

    PEER_PY gptqmodel_logits.py GPTQ_DIR INPUT_IDS.safetensors OUT_LOGITS.safetensors [--dtype float32]

Path exercised: `AutoModelForCausalLM.from_pretrained(dir, quantization_config=GPTQConfig(...))`
-> transformers' GptqHfQuantizer -> optimum's GPTQQuantizer.convert_model -> GPTQModel's
`TorchLinear` ("gptq_torch" backend: the only GPTQModel kernel that accepts every bits/group size
on CPU). `bits` is taken from the folder's own config.json; everything else (group size,
desc_act, sym, checkpoint_format) is read from there by transformers too, as it would be for any
user. The output file holds only `logits` (float32). The last stdout line is a JSON object saying
which kernel ran and in which dtypes the forward and the dequantization actually ran (the latter is
the `scales` buffer dtype: TorchLinear computes `scales[g_idx] * (q - z)` in the scales' dtype and
only then casts to x's), plus tool versions. That is not stored as safetensors metadata because
the header is serialized from a hash map in random order: the file's bytes would change on every
regeneration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gptq_dir")
    p.add_argument("input_ids")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--native", action="store_true",
                   help="load with GPTQModel.load (reads per-module `dynamic`), not transformers")
    return p.parse_args(argv)


def load_quantized(gptq_dir: str, dtype: torch.dtype):  # -> PreTrainedModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((Path(gptq_dir) / "config.json").read_text())["quantization_config"]["bits"]
    # Passing a GPTQConfig merges with the folder's quantization_config (the folder wins for
    # the format fields); its only purpose here is to pin the backend. Without it transformers
    # picks GPTQModel's "auto" CPU kernel, which refuses some shapes/bit widths.
    qcfg = GPTQConfig(bits=bits, backend="gptq_torch")
    model = AutoModelForCausalLM.from_pretrained(
        gptq_dir, quantization_config=qcfg, dtype=dtype, device_map="cpu"
    )
    return model.eval()


def load_native(gptq_dir: str, dtype: torch.dtype):  # -> PreTrainedModel
    """GPTQModel's own loader: the path that honours per-module `dynamic` overrides (transformers'
    GPTQConfig has no `dynamic` and refuses such a folder with a size mismatch)."""
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(gptq_dir, backend=BACKEND.TORCH, device="cpu", dtype=dtype).model.eval()


def quant_module_facts(model: torch.nn.Module) -> dict[str, str]:
    """Which kernel class ran and in which dtypes, recorded next to the logits."""
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    scales = {str(m.scales.dtype) for m in model.modules() if hasattr(m, "scales")}
    if not kernels:
        raise SystemExit("no quantized module was created: the folder did not load as GPTQ")
    return {"kernels": ",".join(kernels), "scales_dtype": ",".join(sorted(scales))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = (load_native if args.native else load_quantized)(args.gptq_dir, dtype)
    ids = load_file(args.input_ids)["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False)
    logits = out.logits
    from importlib.metadata import version

    meta = {
        "forward_dtype": str(logits.dtype),
        **{pkg: version(pkg) for pkg in ("gptqmodel", "optimum", "transformers", "torch")},
        **quant_module_facts(model),
    }
    save_file({"logits": logits.float().contiguous()}, args.out)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
