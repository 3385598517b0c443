"""quantize -> write -> load round trip, against an independent in-memory quantization."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantpress
from peers.tiny_models import eval_ids, save_tiny_model
from quantpress import CalibrationConfig, QuantConfig
from quantpress.layerwise import capture_layer_inputs, forward_layer, quantize_layer
from quantpress.models.arch import LLAMA_LIKE
from quantpress.runtime.qlinear import QuantLinear

CALIB = CalibrationConfig(nsamples=8, seqlen=64)


def in_memory_quantized(src, quant, examples, batch_size=8):
    """The whole fp32 model in memory, quantized layer by layer with plain transformers modules.

    Same batch size as the pipeline's default: Hessian sums split differently round differently.
    """
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layers = model.model.layers
    inputs = capture_layer_inputs(model.model, layers, examples)
    results = {}
    for i, layer in enumerate(layers):
        for r in quantize_layer(layer, LLAMA_LIKE, inputs, quant, batch_size=batch_size, where=f"layer {i}"):
            results[f"model.layers.{i}.{r.name}"] = r
        inputs = type(inputs)(forward_layer(layer, inputs, batch_size), inputs.kwargs)
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
    loaded = quantpress.load(report.out_dir)

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


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_every_family_in_the_table_round_trips(tmp_path, examples, arch):
    src = save_tiny_model(tmp_path / "src", arch)
    quant = QuantConfig(bits=4, group_size=32, act_order=True)
    out = quantpress.quantize(src, tmp_path / "out", quant, CALIB, examples=examples).out_dir
    reference, _ = in_memory_quantized(src, quant, examples)
    ids = eval_ids(2, 48)  # longer than mistral's 32-token sliding window
    with torch.inference_mode():
        assert torch.equal(quantpress.load(out).model(input_ids=ids).logits, reference(input_ids=ids).logits)


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
    loaded = quantpress.load(out)
    assert loaded.format_info.checkpoint_format.value == "gptq" and loaded.format_info.desc_act
    ids = eval_ids(2, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)
