"""load(): a full-precision or GPTQ model folder -> a runnable transformers model on CPU.

GPTQ folders from quantpress, AutoGPTQ and GPTQModel (v1 and v2 qzeros, act-order g_idx, any
bit width) load the same way: build the model on `meta`, put a QuantLinear wherever the file
holds a `<module>.qweight`, and assign the checkpoint tensors. quantpress never goes through
transformers' own GPTQ path, so no optimum/GPTQModel install is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantpress.errors import CheckpointError
from quantpress.formats.gptq_config import GPTQFormatInfo, read_format_info
from quantpress.formats.hf_folder import ModelFolder, has_tokenizer, load_tokenizer, read_json
from quantpress.models.arch import architecture_for
from quantpress.models.skeleton import assign_weights, build_on_meta, hf_config, materialize_buffers
from quantpress.runtime.qlinear import pack_all, swap_linears
from quantpress.runtime.stored_dtype import keep_stored_dtype

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class LoadedModel:
    model: nn.Module  # a transformers PreTrainedModel in eval mode
    tokenizer: object | None  # a transformers tokenizer, when the folder ships one
    path: Path
    config: dict  # config.json as read
    format_info: GPTQFormatInfo | None  # None for a full-precision folder

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def read_quantization(folder: ModelFolder) -> GPTQFormatInfo | None:
    """The folder's GPTQ settings, or None when it is full precision."""
    qc_path = folder.path / "quantize_config.json"
    quantize_config = read_json(qc_path) if qc_path.exists() else None
    if "quantization_config" not in folder.config and quantize_config is None:
        return None
    return read_format_info(folder.config, quantize_config)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
         exact: bool = False) -> LoadedModel:
    """Load a model folder for inference on CPU; GPTQ weights stay packed in memory, and the
    embedding and head stay in the checkpoint's dtype (runtime/stored_dtype.py).

    Quantized Linears run this CPU's int kernels for few rows (decode) with bf16 activations and
    dequantize exactly for many rows (runtime/kernels.py). `exact=True` dequantizes at every call,
    so logits equal the fake-quantized model's bit for bit (tests, reference evaluations)."""
    folder = ModelFolder(path)
    info = read_quantization(folder)
    model = build_on_meta(hf_config(folder.config), dtype)
    if info is not None:
        keep_stored_dtype(model, lambda name: folder.dtype(name) if name in folder.file_of else None, dtype, exact)
    state = folder.read(folder.names())
    if info is not None:
        architecture_for(folder.config)  # clear error for an unsupported family
        quantized = sorted({n.rpartition(".")[0] for n in state if n.endswith(".qweight")})
        if not quantized:
            raise CheckpointError(f"{folder.path} declares GPTQ quantization but holds no qweight tensors")
        for name in quantized:  # per module: `dynamic` may store some at other bits
            swap_linears(model, [name], *info.module_settings(name), info.checkpoint_format)
        _fill_default_g_idx(model, state, quantized, info)
    tied = _tied_keys(model)
    assign_weights(model, state, str(folder.path), allow_missing=tied)
    del state  # the model holds the tensors now; packing below frees each layer's checkpoint copy
    pack_all(model, exact=exact)
    if tied:
        model.tie_weights()
    materialize_buffers(model)
    _check_materialized(model, Path(path))
    tok = load_tokenizer(folder.path) if tokenizer and has_tokenizer(folder.path) else None
    return LoadedModel(model, tok, Path(path), folder.config, info)


def _fill_default_g_idx(model: nn.Module, state: dict, names: list[str], info: GPTQFormatInfo) -> None:
    """Old files may omit g_idx; it is then the trivial k // group_size (spec A5)."""
    for name in names:
        key = f"{name}.g_idx"
        if key not in state:
            k = model.get_submodule(name).in_features
            group_size = info.module_settings(name)[1]
            gs = k if group_size == -1 else group_size
            state[key] = (torch.arange(k) // gs).to(torch.int32)


def _tied_keys(model: nn.Module) -> frozenset[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return frozenset()
    return frozenset({"lm_head.weight"})


def _check_materialized(model: nn.Module, path: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: no weights for {left[:5]}")

