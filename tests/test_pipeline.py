"""quantize -> write -> load round trip, against an independent in-memory quantization."""

from __future__ import annotations

import json

import pytest
import torch
from peers.tiny_models import eval_ids, save_tiny_model
from transformers import AutoModelForCausalLM

import quantpress
from quantpress import CalibrationConfig, QuantConfig
from quantpress.layerwise import capture_layer_inputs, forward_layer_, quantize_layer, quantize_layer_blockwise
from quantpress.models.arch import LLAMA_LIKE
from quantpress.runtime.qlinear import QuantLinear

# fp32 calibration: the round trip is then bit-exact down to the logits (bf16 is tested below)
CALIB = CalibrationConfig(nsamples=8, seqlen=64, compute_dtype="float32")


def in_memory_quantized(src, quant, examples, batch_size=8, dtype=torch.float32, source_weights=True):
    """The whole model in memory (in `dtype`), quantized layer by layer with plain transformers
    modules; with `source_weights`, GPTQ quantizes the checkpoint's fp32 tensors, as the pipeline
    does, rather than the layer's (possibly bf16-rounded) copies.

    Same batch size as the pipeline's default: Hessian sums split differently round differently.
    """
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).model.layers
    layers = model.model.layers
    inputs = capture_layer_inputs(model.model, layers, examples)
    results = {}
    for i, layer in enumerate(layers):
        source = original[i].state_dict() if source_weights else None
        for r in quantize_layer(layer, LLAMA_LIKE, inputs, quant, batch_size=batch_size, where=f"layer {i}",
                                source=source):
            results[f"model.layers.{i}.{r.name}"] = r
        inputs = forward_layer_(layer, inputs, batch_size)
    return model, results


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("quant", [
    QuantConfig(bits=4, group_size=32, act_order=True),
    QuantConfig(bits=3, group_size=64, sym=False),
    QuantConfig(bits=2, group_size=-1, true_sequential=False),
    QuantConfig(bits=8, group_size=48),  # 48 does not divide 128: the last group is smaller
], ids=lambda q: quantpress.variant_name(q))
def test_round_trip_is_bit_identical(request, tmp_path, examples, model_fixture, quant):
    src = request.getfixturevalue(model_fixture)
    report = quantpress.quantize(src, tmp_path / "out", quant, CALIB, examples=examples)
    reference, results = in_memory_quantized(src, quant, examples)
    loaded = quantpress.load(report.out_dir, exact=True)

    for name, expected in results.items():
        module = loaded.model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        got = module.quantized_weight()
        assert torch.equal(got.intweight, expected.weight.intweight), name
        assert torch.equal(got.scales, expected.weight.scales), name
        assert torch.equal(got.zeros, expected.weight.zeros), name
        assert torch.equal(got.g_idx, expected.weight.g_idx), name

    ids = eval_ids(2, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)

    config = json.loads((report.out_dir / "config.json").read_text())["quantization_config"]
    assert config["bits"] == quant.bits and config["group_size"] == quant.group_size
    assert config["checkpoint_format"] == ("gptq" if quant.sym else "gptq_v2")
    assert json.loads((report.out_dir / "quantize_config.json").read_text()) == config


def _same_integers(loaded, results) -> bool:
    return all(torch.equal(loaded.model.get_submodule(name).quantized_weight().intweight, r.weight.intweight)
               for name, r in results.items())


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("quant", [QuantConfig(bits=4, group_size=32, act_order=True), QuantConfig(bits=8, sym=False)],
                         ids=lambda q: quantpress.variant_name(q))
def test_bf16_calibration_matches_in_memory_bf16_and_quantizes_the_fp32_source(
        request, tmp_path, examples, model_fixture, quant):
    """The default bf16 calibration (fp32 checkpoint here) gives exactly the in-memory bf16
    result, and that result depends on quantizing the checkpoint's fp32 weights: quantizing
    the bf16-rounded copies would give other integers."""
    src = request.getfixturevalue(model_fixture)
    calib = CalibrationConfig(nsamples=8, seqlen=64)
    assert calib.compute_dtype == "bfloat16"
    loaded = quantpress.load(quantpress.quantize(src, tmp_path / "out", quant, calib, examples=examples).out_dir)
    _, results = in_memory_quantized(src, quant, examples, dtype=torch.bfloat16)
    assert _same_integers(loaded, results)
    _, rounded = in_memory_quantized(src, quant, examples, dtype=torch.bfloat16, source_weights=False)
    assert not _same_integers(loaded, rounded)


def test_bf16_calibration_is_as_good_as_fp32(tmp_path, tiny_llama, examples):
    """bf16 activations change the Hessians only slightly: the 3-bit model's logit error against
    full precision stays within 10% of the fp32-calibrated one's."""
    fp = quantpress.load(tiny_llama).model
    ids = eval_ids(4, 64)
    quant = QuantConfig(bits=3, group_size=32, act_order=True)
    errors = {}
    for dtype in ("float32", "bfloat16"):
        calib = CalibrationConfig(nsamples=8, seqlen=64, compute_dtype=dtype)
        out = quantpress.quantize(tiny_llama, tmp_path / dtype, quant, calib, examples=examples).out_dir
        with torch.inference_mode():
            errors[dtype] = (quantpress.load(out).model(input_ids=ids).logits - fp(input_ids=ids).logits).abs().mean()
    assert errors["bfloat16"] <= 1.1 * errors["float32"], errors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_blockwise_pass_is_bit_identical_to_rerunning_the_layer(tmp_path, examples, arch):
    """quantize_layer_blockwise (each residual block run once per stage, o_proj inputs cached)
    computes exactly what re-running the whole layer up to each group and then forward_layer_
    compute, including the propagated activations. batch 3 over 8 windows: a ragged last batch."""
    src = save_tiny_model(tmp_path / "src", arch)
    quant = QuantConfig(bits=3, group_size=32, act_order=True)
    runs = {}
    for path in ("opaque layer", "blockwise"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        inputs = capture_layer_inputs(model.model, model.model.layers, examples)
        results = []
        for layer in model.model.layers:
            if path == "blockwise":
                results += quantize_layer_blockwise(layer, LLAMA_LIKE, inputs, quant, batch_size=3, where="l")
            else:
                results += quantize_layer(layer, LLAMA_LIKE, inputs, quant, batch_size=3, where="l")
                forward_layer_(layer, inputs, 3)
        runs[path] = (results, inputs.hidden)
    (expected, hidden), (got, got_hidden) = runs["opaque layer"], runs["blockwise"]
    assert [r.name for r in got] == [r.name for r in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a.weight.intweight, b.weight.intweight) and torch.equal(a.weight.scales, b.weight.scales)
        assert a.loss == b.loss, a.name
    assert torch.equal(got_hidden, hidden)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_every_family_in_the_table_round_trips(tmp_path, examples, arch):
    src = save_tiny_model(tmp_path / "src", arch)
    quant = QuantConfig(bits=4, group_size=32, act_order=True)
    out = quantpress.quantize(src, tmp_path / "out", quant, CALIB, examples=examples).out_dir
    reference, _ = in_memory_quantized(src, quant, examples)
    ids = eval_ids(2, 48)  # longer than mistral's 32-token sliding window
    with torch.inference_mode():
        assert torch.equal(quantpress.load(out, exact=True).model(input_ids=ids).logits,
                           reference(input_ids=ids).logits)


def test_quantized_logits_approach_full_precision_as_bits_grow(tmp_path, tiny_llama, examples):
    fp = quantpress.load(tiny_llama).model
    ids = eval_ids(2, 32)
    errors = {}
    for bits in (2, 4, 8):
        out = quantpress.quantize(tiny_llama, tmp_path / f"b{bits}", QuantConfig(bits=bits, group_size=32), CALIB,
                                  examples=examples).out_dir
        with torch.inference_mode():
            errors[bits] = (quantpress.load(out).model(input_ids=ids).logits - fp(input_ids=ids).logits).abs().mean()
    assert errors[8] < 0.1 * errors[4] < 0.1 * errors[2]


def test_autogptq_folder_layout_loads(tmp_path, tiny_llama, examples):
    """AutoGPTQ's layout: `gptq_model-4bit-32g.safetensors`, a config.json without
    quantization_config, and a quantize_config.json in its own keys (no checkpoint_format: v1)."""
    quant = QuantConfig(bits=4, group_size=32, act_order=True)
    out = quantpress.quantize(tiny_llama, tmp_path / "q", quant, CALIB, examples=examples).out_dir
    (out / "model.safetensors").rename(out / "gptq_model-4bit-32g.safetensors")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").write_text(json.dumps({
        "bits": 4, "group_size": 32, "damp_percent": 0.1, "desc_act": True, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
    }))
    reference, _ = in_memory_quantized(tiny_llama, quant, examples)
    loaded = quantpress.load(out, exact=True)
    assert loaded.format_info.checkpoint_format.value == "gptq" and loaded.format_info.desc_act
    ids = eval_ids(2, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)
