"""Layer-by-layer GPTQ over a transformers decoder: the only code that hooks model modules.

The flow per decoder layer i (spec B4):
  inputs X_i [n, T, hidden] -> for each input group (q/k/v, o, gate/up, down): run the layer on
  X_i with a pre-hook that accumulates the group's Hessian and stops the forward right there,
  then quantize the group's Linears (their fake-quant weights replace the originals, so later
  groups see quantized outputs) -> X_{i+1} = layer(X_i) with every Linear quantized.
Modules of one group read the same tensor, so one Hessian serves the whole group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantpress.config import Method, QuantConfig
from quantpress.errors import HessianNotPositiveDefinite, NonFiniteError
from quantpress.models.arch import Architecture
from quantpress.models.skeleton import return_freed_memory
from quantpress.quant.gptq import (
    GPTQResult,
    HessianAccumulator,
    all_finite,
    gptq_quantize,
)
from quantpress.quant.qweight import QuantizedWeight
from quantpress.quant.rtn import rtn_quantize


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; caught only in `_run_until_stopped`."""


@dataclass(frozen=True)
class LayerInputs:
    hidden: Tensor  # [n, T, hidden] the calibration activations entering the current layer
    kwargs: dict  # attention mask, position embeddings, ... exactly as the model passes them


@dataclass(frozen=True)
class ModuleResult:
    name: str  # e.g. "self_attn.q_proj"
    weight: QuantizedWeight
    bias: Tensor | None  # fp16, as stored (None when the Linear has no bias)
    loss: float  # GPTQ's summed squared error proxy (0 for RTN)
    damp_percent: float  # damping actually used (after any retries)


def _run_until_stopped(fn: Callable[[], object]) -> None:
    try:
        fn()
    except _StopForward:
        pass


@torch.no_grad()
def capture_layer_inputs(base_model: nn.Module, layers: nn.ModuleList, examples: Tensor) -> LayerInputs:
    """Embed the calibration windows with the model's own forward and catch what enters layer 0.

    Windows go one at a time (batch 1), so every captured kwarg has batch dimension 1 and
    broadcasts over any batch later; all windows share one length and no padding, so the
    kwargs of the first window serve them all. The activations go straight into one
    preallocated [n, T, hidden] buffer: collecting a list and concatenating would hold two copies.
    """
    hidden: Tensor | None = None
    kwargs: dict = {}
    row = 0

    def catch(_module: nn.Module, args: tuple, kw: dict) -> None:
        nonlocal hidden
        x = args[0] if args else kw["hidden_states"]  # [1, T, hidden]
        if hidden is None:
            hidden = x.new_empty((len(examples), *x.shape[1:]))
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        hidden[row] = x[0]
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row, window in enumerate(examples):
            _run_until_stopped(lambda: base_model(input_ids=window[None], use_cache=False))
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def forward_layer_(layer: nn.Module, inputs: LayerInputs, batch_size: int) -> LayerInputs:
    """Run the layer on all calibration activations, `batch_size` windows at a time, writing each
    batch's output over its input (the trailing underscore: in place, as in torch). The inputs
    are dead once the layer is quantized, so one activation buffer serves the whole model."""
    for batch in inputs.hidden.split(batch_size):
        out = layer(batch, **inputs.kwargs)
        out = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns tuples
        if not all_finite(out):  # per batch: a whole-buffer check would allocate a full copy
            raise NonFiniteError("calibration activations became NaN/Inf")
        batch.copy_(out)
    return inputs


@torch.no_grad()
def collect_hessians(
    layer: nn.Module, groups: list[tuple[str, ...]], inputs: LayerInputs, batch_size: int
) -> dict[tuple[str, ...], Tensor]:
    """One Hessian per input group, from one pass that stops at the last group's input."""
    accumulators = {group: None for group in groups}
    handles = []

    def hook_for(group: tuple[str, ...], last: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # [B, T, K]
            if accumulators[group] is None:
                accumulators[group] = HessianAccumulator(x.shape[-1], device=x.device)
            accumulators[group].add_batch(x)
            if last:
                raise _StopForward  # nothing after this module is needed for these Hessians
        return hook

    for i, group in enumerate(groups):
        first = layer.get_submodule(group[0])
        handles.append(first.register_forward_pre_hook(hook_for(group, i == len(groups) - 1)))
    try:
        for batch in inputs.hidden.split(batch_size):
            _run_until_stopped(lambda: layer(batch, **inputs.kwargs))
    finally:
        for h in handles:
            h.remove()
    return {group: acc.H for group, acc in accumulators.items()}


def quantize_module(linear: nn.Linear, W: Tensor, bias: Tensor | None, H: Tensor | None,
                    quant: QuantConfig) -> tuple[QuantizedWeight, float, float]:
    """Quantize W (the source weight, full precision) and write its fake-quant version into
    `linear` (which computes in the calibration dtype), so later passes see the quantized layer."""
    if quant.method is Method.RTN:
        weight, loss, damp = rtn_quantize(W, quant), 0.0, 0.0
        fake = weight.dequantize()
    else:
        result: GPTQResult = gptq_quantize(W, H, quant)
        weight, loss, damp, fake = result.weight, result.loss, result.damp_percent, result.fake
    linear.weight.data = fake.to(linear.weight.dtype)
    if bias is not None:
        # The checkpoint stores the bias in fp16; compute with exactly what will be loaded.
        linear.bias.data = bias.to(linear.bias.dtype)
    return weight, loss, damp


@torch.no_grad()
def quantize_layer(
    layer: nn.Module,
    arch: Architecture,
    inputs: LayerInputs | None,
    quant: QuantConfig,
    *,
    batch_size: int,
    where: str,
    source: Mapping[str, Tensor] | None = None,
) -> list[ModuleResult]:
    """Quantize every Linear of one decoder layer in place (GPTQ needs `inputs`; RTN does not).

    `source` maps "self_attn.q_proj.weight"-style names to the checkpoint's own tensors: GPTQ
    quantizes those, not the layer's copies, which may have been rounded to a lower compute dtype
    (an fp16 checkpoint calibrated in bf16 would otherwise lose 3 mantissa bits before 8-bit
    quantization even starts). Without it the layer's own parameters are the source.
    """
    groups = list(arch.input_groups)
    # true-sequential: one group at a time, each seeing the already-quantized earlier groups.
    stages = [[g] for g in groups] if quant.true_sequential else [groups]
    results: list[ModuleResult] = []
    for stage in stages:
        hessians = (
            collect_hessians(layer, stage, inputs, batch_size)
            if quant.method is Method.GPTQ
            else dict.fromkeys(stage)
        )
        for group in stage:
            for name in group:
                linear = layer.get_submodule(name)
                W = linear.weight.data if source is None else source[f"{name}.weight"]
                bias = None
                if linear.bias is not None:
                    bias = (linear.bias.data if source is None else source[f"{name}.bias"]).half()
                try:
                    weight, loss, damp = quantize_module(linear, W, bias, hessians[group], quant)
                except (HessianNotPositiveDefinite, NonFiniteError) as e:
                    raise type(e)(f"{where}.{name}: {e}") from None
                results.append(ModuleResult(name, weight, bias, loss, damp))
                return_freed_memory()  # GPTQ's K x K work arrays (32 MB each for down_proj)
    return results
