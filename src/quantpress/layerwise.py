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
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quantpress.config import Method, QuantConfig
from quantpress.errors import HessianNotPositiveDefinite, NonFiniteError
from quantpress.mixed_precision import UPGRADE_BITS
from quantpress.models.arch import Architecture
from quantpress.models.skeleton import return_freed_memory
from quantpress.quant.gptq import (
    GPTQResult,
    HessianAccumulator,
    all_finite,
    gptq_quantize,
    output_error,
)
from quantpress.quant.qweight import QuantizedWeight
from quantpress.quant.rtn import rtn_quantize
from quantpress.quant.signround import RoundingState, SignRoundSettings, signround


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; caught only in `_run_until_stopped`."""


@dataclass(frozen=True)
class LayerInputs:
    hidden: Tensor  # [n, T, hidden] the calibration activations entering the current layer
    kwargs: dict  # attention mask, position embeddings, ... exactly as the model passes them
    # [n, T, hidden] what enters the same layer in the full-precision model, for SignRound with
    # signround_target "model" (None otherwise: nothing else needs the second stream)
    reference: Tensor | None = None

    def with_reference(self) -> LayerInputs:
        return replace(self, reference=self.hidden.clone())


@dataclass(frozen=True)
class ModuleResult:
    name: str  # e.g. "self_attn.q_proj"
    weight: QuantizedWeight
    bias: Tensor | None  # fp16, as stored (None when the Linear has no bias)
    loss: float  # GPTQ's summed squared error proxy (0 for RTN)
    damp_percent: float  # damping actually used (after any retries)
    error: float = 0.0  # output error tr((W - Q) H (W - Q)^T), with an upgrade budget only
    upgrade: QuantizedWeight | None = None  # the same module at UPGRADE_BITS (mixed_precision.py)
    upgrade_error: float = 0.0


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


def quantize_module(name: str, linear: nn.Linear, W: Tensor, bias: Tensor | None, H: Tensor | None,
                    quant: QuantConfig) -> ModuleResult:
    """Quantize W (the source weight, full precision) and write its fake-quant version into
    `linear` (which computes in the calibration dtype), so later passes see the quantized layer.
    With an upgrade budget the module is also solved at UPGRADE_BITS and both output errors are
    kept for the choice after the last layer; later passes see the base-bit weights."""
    if quant.method is Method.RTN:
        weight = rtn_quantize(W, quant)
        result = ModuleResult(name, weight, bias, 0.0, 0.0)
        fake = weight.dequantize()
    else:
        solved: GPTQResult = gptq_quantize(W, H, quant)
        result = ModuleResult(name, solved.weight, bias, solved.loss, solved.damp_percent)
        fake = solved.fake
        if quant.upgrade_budget:
            high = gptq_quantize(W, H, replace(quant, bits=UPGRADE_BITS, upgrade_budget=0.0))
            result = replace(result, error=output_error(W, fake, H), upgrade=high.weight,
                             upgrade_error=output_error(W, high.fake, H))
    linear.weight.data = fake.to(linear.weight.dtype)
    if bias is not None:
        # The checkpoint stores the bias in fp16; compute with exactly what will be loaded.
        linear.bias.data = bias.to(linear.bias.dtype)
    return result


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
            if quant.calibrated
            else dict.fromkeys(stage)
        )
        for group in stage:
            results += quantize_group(layer, group, hessians[group], quant, where, source)
    return results


def quantize_group(layer: nn.Module, group: tuple[str, ...], H: Tensor | None, quant: QuantConfig, where: str,
                    source: Mapping[str, Tensor] | None) -> list[ModuleResult]:
    results = []
    for name in group:
        linear = layer.get_submodule(name)
        W = linear.weight.data if source is None else source[f"{name}.weight"]
        bias = None
        if linear.bias is not None:
            bias = (linear.bias.data if source is None else source[f"{name}.bias"]).half()
        try:
            results.append(quantize_module(name, linear, W, bias, H, quant))
        except (HessianNotPositiveDefinite, NonFiniteError) as e:
            raise type(e)(f"{where}.{name}: {e}") from None
        return_freed_memory()  # GPTQ's K x K work arrays (32 MB each for down_proj)
    return results


@torch.no_grad()
def quantize_and_propagate(
    layer: nn.Module,
    arch: Architecture,
    inputs: LayerInputs | None,
    quant: QuantConfig,
    *,
    batch_size: int,
    where: str,
    source: Mapping[str, Tensor] | None = None,
    propagate: bool = True,
) -> list[ModuleResult]:
    """Quantize one decoder layer and, with `propagate`, leave the quantized layer's output in
    `inputs.hidden` for the next layer. True-sequential GPTQ on a layer the table describes as
    residual blocks takes the blockwise path; everything else re-runs the opaque layer.
    SignRound first computes its targets (signround_targets), then refines GPTQ's result."""
    if quant.method is Method.SIGNROUND:
        if source is None:  # GPTQ overwrites the layer's weights; SignRound needs the originals
            source = {f"{name}.weight": layer.get_submodule(name).weight.data.clone() for name in arch.quantized_modules}
        delta = signround_targets(layer, inputs, batch_size)  # before GPTQ replaces the weights
        results = quantize_layer(layer, arch, inputs, quant, batch_size=batch_size, where=where, source=source)
        results = refine_layer(layer, results, inputs, delta, quant, source)
        del delta
        if propagate:
            forward_layer_(layer, inputs, batch_size)
        return results
    if inputs is not None and quant.method is Method.GPTQ and quant.true_sequential and arch.blocks is not None:
        return quantize_layer_blockwise(layer, arch, inputs, quant, batch_size=batch_size, where=where, source=source)
    results = quantize_layer(layer, arch, inputs, quant, batch_size=batch_size, where=where, source=source)
    if inputs is not None and propagate:
        forward_layer_(layer, inputs, batch_size)
    return results


@torch.no_grad()
def quantize_layer_blockwise(
    layer: nn.Module,
    arch: Architecture,
    inputs: LayerInputs,
    quant: QuantConfig,
    *,
    batch_size: int,
    where: str,
    source: Mapping[str, Tensor] | None = None,
) -> list[ModuleResult]:
    """True-sequential GPTQ of a pre-norm layer, block by block, with the output left in place.

    The same module calls on the same tensors as `quantize_layer` + `forward_layer_`, so the
    results are bit-identical; what changes is how often they run. Re-running the opaque layer up
    to each group runs q/k/v four times, attention three, o and gate/up three, down once (with the
    final forward); here each block runs norm(x) for its input group's Hessian, then its mixer up to
    the output projection, then x += mixer(norm(x)) with everything quantized: q/k/v, attention
    and gate/up twice, o and down once. The output projection's input is also cached from the
    second pass when it is no wider than x (attention: 128 MB for 128 x 512 x 1024 in bf16),
    which saves the third q/k/v + attention pass; the MLP's wider input is recomputed instead.
    """
    X = inputs.hidden  # [n, T, hidden], the block input, overwritten by the block output
    results: list[ModuleResult] = []
    for block in arch.blocks:
        norm, mixer = layer.get_submodule(block.norm), layer.get_submodule(block.mixer)
        output_proj = layer.get_submodule(block.output_proj)
        kwargs = inputs.kwargs if block.takes_layer_kwargs else {}
        input_group = next(g for g in arch.input_groups
                           if g[0].startswith(block.mixer + ".") and block.output_proj not in g)

        acc = HessianAccumulator(X.shape[-1], device=X.device)
        for xb in X.split(batch_size):
            acc.add_batch(norm(xb))
        results += quantize_group(layer, input_group, acc.H, quant, where, source)

        acc, cache = _output_proj_inputs(norm, mixer, output_proj, X, kwargs, batch_size)
        results += quantize_group(layer, (block.output_proj,), acc.H, quant, where, source)

        for i, xb in zip(range(0, len(X), batch_size), X.split(batch_size)):
            if cache is not None:
                y = output_proj(cache[i : i + batch_size])
            else:
                y = _call_mixer(mixer, norm(xb), kwargs)
            if not all_finite(y):
                raise NonFiniteError(f"{where}: calibration activations became NaN/Inf")
            xb.add_(y)  # == the layer's `residual + hidden_states`, written over the input
        del cache
    return results


@contextmanager
def _in_fp32(layer: nn.Module):
    """Run SignRound's passes over the layer in fp32, then give it back its own dtype (a cast
    between bf16/fp16 and fp32 is exact both ways for the layer's own parameters)."""
    dtype = next(layer.parameters()).dtype
    layer.float()
    try:
        yield
    finally:
        layer.to(dtype)


@torch.no_grad()
def signround_targets(layer: nn.Module, inputs: LayerInputs, batch_size: int) -> Tensor:
    """What the full-precision layer adds to the residual stream, [n, T, hidden] in the stream's
    dtype: fp_layer(x) - x on the quantized model's inputs x, or, when `inputs` carries the
    full-precision stream (signround_target "model"), fp_layer(x_fp) - x, which also advances that
    stream to the next layer. Computed in fp32: the difference is small next to x."""
    delta = torch.empty_like(inputs.hidden)
    with _in_fp32(layer):
        for i in range(0, len(inputs.hidden), batch_size):
            x = inputs.hidden[i : i + batch_size].float()
            source = x if inputs.reference is None else inputs.reference[i : i + batch_size].float()
            out = layer(source, **inputs.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if not all_finite(out):
                raise NonFiniteError("calibration activations became NaN/Inf")
            delta[i : i + batch_size] = out - x
            if inputs.reference is not None:
                inputs.reference[i : i + batch_size] = out
    return delta


def refine_layer(layer: nn.Module, results: list[ModuleResult], inputs: LayerInputs, delta: Tensor,
                 quant: QuantConfig, source: Mapping[str, Tensor]) -> list[ModuleResult]:
    """SignRound over the whole layer, from GPTQ's `results`: inputs.hidden are the quantized
    model's activations entering the layer, `delta` [n, T, hidden] what the layer should add to
    them (signround_targets). Runs the layer in fp32; writes the refined fake-quant weights into
    its Linears in their own dtype."""
    states = {r.name: RoundingState(source[f"{r.name}.weight"], r.weight, quant.group_size, quant.sym)
              for r in results}
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:  # only the rounding is learned; no gradients for norms and biases
        p.requires_grad_(False)

    def layer_fn(weights: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(layer, {f"{name}.weight": w for name, w in weights.items()}, (x,), inputs.kwargs)
        return out[0] if isinstance(out, tuple) else out

    try:
        with _in_fp32(layer):
            signround(layer_fn, states, inputs.hidden, delta,
                      SignRoundSettings(iters=quant.signround_iters, lr=quant.signround_lr))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    refined = []
    for r in results:
        weight, linear = states[r.name].weight(), layer.get_submodule(r.name)
        linear.weight.data = weight.dequantize().to(linear.weight.dtype)
        refined.append(replace(r, weight=weight))
    return refined


def _call_mixer(mixer: nn.Module, h: Tensor, kwargs: dict) -> Tensor:
    out = mixer(hidden_states=h, **kwargs) if kwargs else mixer(h)
    return out[0] if isinstance(out, tuple) else out  # attention returns (output, weights)


def _output_proj_inputs(norm: nn.Module, mixer: nn.Module, output_proj: nn.Module, X: Tensor, kwargs: dict,
                        batch_size: int) -> tuple[HessianAccumulator, Tensor | None]:
    """Run mixer(norm(x)) up to its output projection: that Linear's Hessian, plus its inputs
    for every window when they are no wider than x (None otherwise)."""
    acc = HessianAccumulator(output_proj.in_features, device=X.device)
    keep = output_proj.in_features <= X.shape[-1]
    cache = X.new_empty((*X.shape[:-1], output_proj.in_features)) if keep else None
    rows = slice(0, 0)

    def hook(_module: nn.Module, args: tuple) -> None:
        acc.add_batch(args[0])
        if cache is not None:
            cache[rows] = args[0]
        raise _StopForward

    handle = output_proj.register_forward_pre_hook(hook)
    try:
        for i, xb in zip(range(0, len(X), batch_size), X.split(batch_size)):
            rows = slice(i, i + len(xb))
            _run_until_stopped(lambda: _call_mixer(mixer, norm(xb), kwargs))
    finally:
        handle.remove()
    return acc, cache
