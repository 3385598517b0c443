"""quantize_shared: every variant's Hessians from one full-precision pass, checked against an
independent in-memory computation, plus per-variant resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantpress
from quantpress import CalibrationConfig, QuantConfig
from quantpress.errors import ConfigError
from quantpress.models.arch import LLAMA_LIKE
from quantpress.pipeline import quantize_shared
from quantpress.quant.gptq import HessianAccumulator, gptq_quantize

CALIB = CalibrationConfig(nsamples=8, seqlen=64, compute_dtype="float32")
VARIANTS = [QuantConfig(bits=4, group_size=32, act_order=True, true_sequential=False),
            QuantConfig(bits=3, group_size=-1, true_sequential=False)]


def full_precision_hessians(src, examples, batch_size=8) -> dict[str, torch.Tensor]:
    """H of every quantized Linear, from the unquantized model's own forward (plain hooks)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    accumulators, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in LLAMA_LIKE.quantized_modules:
            full = f"model.layers.{i}.{name}"
            linear = layer.get_submodule(name)
            accumulators[full] = HessianAccumulator(linear.in_features)
            handles.append(linear.register_forward_pre_hook(
                lambda _m, args, acc=accumulators[full]: acc.add_batch(args[0])))
    with torch.no_grad():
        for batch in examples.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return {name: acc.H for name, acc in accumulators.items()}, model


def test_shared_variants_equal_gptq_on_full_precision_hessians(tmp_path, tiny_llama, examples):
    outs = [tmp_path / f"v{i}" for i in range(len(VARIANTS))]
    reports = quantize_shared(tiny_llama, list(zip(outs, VARIANTS)), CALIB, examples=examples)
    hessians, model = full_precision_hessians(tiny_llama, examples)

    for report, quant in zip(reports, VARIANTS):
        qc = json.loads((report.out_dir / "quantize_config.json").read_text())
        assert qc["meta"]["hessian_inputs"] == "full_precision" and qc["bits"] == quant.bits
        loaded = quantpress.load(report.out_dir)
        for name, H in hessians.items():
            W = model.get_submodule(name).weight.data
            expected = gptq_quantize(W, H, quant).weight
            got = loaded.model.get_submodule(name).quantized_weight()
            # Hessian sums over 8 windows in another grouping may differ in the last bit; allow
            # a handful of rounding flips but no systematic difference.
            flips = (got.intweight != expected.intweight).float().mean().item()
            assert flips < 1e-3, (name, flips)


def test_shared_differs_from_sequential_and_is_not_better_by_luck(tmp_path, tiny_llama, examples):
    """The two modes must really differ after layer 0 (else shared mode silently ran sequential)."""
    quant = VARIANTS[1]
    shared = quantize_shared(tiny_llama, [(tmp_path / "s", quant)], CALIB, examples=examples)[0]
    sequential = quantpress.quantize(tiny_llama, tmp_path / "q", quant, CALIB, examples=examples)
    a, b = quantpress.load(shared.out_dir).model, quantpress.load(sequential.out_dir).model
    first = "model.layers.0.self_attn.q_proj"
    last = "model.layers.1.mlp.down_proj"
    assert torch.equal(a.get_submodule(first).quantized_weight().intweight,
                       b.get_submodule(first).quantized_weight().intweight)
    assert not torch.equal(a.get_submodule(last).quantized_weight().intweight,
                           b.get_submodule(last).quantized_weight().intweight)


def test_shared_mode_resumes_each_variant_at_its_own_layer(tmp_path, tiny_llama, examples):
    targets = list(zip([tmp_path / "a", tmp_path / "b"], VARIANTS))
    reference = quantize_shared(tiny_llama, targets, CALIB, examples=examples, overwrite=True)
    expected = {r.out_dir.name: (r.out_dir / "model.safetensors").read_bytes() for r in reference}

    class Interrupt(Exception):
        pass

    def stop_after_first(_stage, done, _total):
        if done == 1:
            raise Interrupt

    for r in reference:
        r.out_dir.rename(r.out_dir.with_name(r.out_dir.name + ".done"))
    with pytest.raises(Interrupt):
        quantize_shared(tiny_llama, targets, CALIB, examples=examples, progress=stop_after_first)
    # variant b is redone from scratch: its staging folder was made with other settings
    (tmp_path / "b.partial" / "progress.json").write_text("{}")
    resumed = quantize_shared(tiny_llama, targets, CALIB, examples=examples)
    assert [r.resumed_layers for r in resumed] == [1, 0]
    for r in resumed:
        assert (r.out_dir / "model.safetensors").read_bytes() == expected[r.out_dir.name]


def test_shared_mode_rejects_true_sequential(tmp_path, tiny_llama, examples):
    with pytest.raises(ConfigError, match="true_sequential=False"):
        quantize_shared(tiny_llama, [(tmp_path / "x", QuantConfig())], CALIB, examples=examples)
