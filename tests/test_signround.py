"""SignRound (issue 12): GPTQ's result refined per decoder layer against the full-precision outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_hardening import digest, kill_at
from transformers import AutoModelForCausalLM

import quantpress
from quantpress import CalibrationConfig, QuantConfig, api
from quantpress.errors import ConfigError
from quantpress.layerwise import LayerInputs, capture_layer_inputs, quantize_layer, refine_layer, signround_targets
from quantpress.models.arch import architecture_for
from quantpress.quant.gptq import gptq_quantize
from quantpress.quant.rtn import rtn_quantize
from quantpress.quant.signround import RoundingState

CALIB = CalibrationConfig(nsamples=8, seqlen=64)


def test_the_start_reproduces_the_given_rounding_exactly():
    torch.manual_seed(0)
    W = torch.randn(48, 200) * 0.05  # 200 = 3 groups of 64 and a narrower last one
    X = torch.randn(512, 200)
    H = 2 * X.t() @ X / 512
    for quant in (QuantConfig(bits=2, group_size=64, act_order=True, static_groups=True, damp_search=True),
                  QuantConfig(bits=3, group_size=64, sym=False, static_groups=True),
                  QuantConfig(bits=4, group_size=-1)):
        for init in (rtn_quantize(W, quant), gptq_quantize(W, H, quant).weight):
            state = RoundingState(W, init, quant.group_size, quant.sym)
            got = state.weight()
            assert torch.equal(got.dequantize(), init.dequantize())
            assert torch.equal(got.g_idx, init.g_idx)
            assert torch.equal(state.fake()[0].detach(), got.dequantize())  # what is learned is what is stored


def test_steps_keep_every_parameter_in_its_box_and_the_weight_on_the_grid():
    torch.manual_seed(1)
    W = torch.randn(16, 128)
    quant = QuantConfig(bits=2, group_size=32, sym=False)
    state = RoundingState(W, rtn_quantize(W, quant), 32, sym=False)
    for _ in range(30):
        fake = state.fake()[0]
        ((fake - W) ** 2 * torch.rand_like(W)).sum().backward()
        state.step(0.3)
    assert state.V.abs().max() <= 0.5 and state.V.abs().max() > 0
    assert state.alpha.min() >= 0.2 and state.alpha.max() <= 1.0 and state.beta.min() >= 0.2
    weight = state.weight()
    assert weight.intweight.min() >= 0 and weight.intweight.max() <= 3
    assert torch.equal(weight.dequantize(), state.fake()[0].detach())


@pytest.fixture(scope="module")
def layer0():
    """The bundled model's first decoder layer with real calibration activations."""
    model = AutoModelForCausalLM.from_pretrained(api.bundled_model_dir(), dtype=torch.float32)
    from quantpress.calibration import calibration_examples
    from quantpress.formats.hf_folder import load_tokenizer

    ids = calibration_examples(load_tokenizer(api.bundled_model_dir()), CalibrationConfig(nsamples=16, seqlen=128))
    inputs = capture_layer_inputs(model.model, model.model.layers, ids)
    return model, inputs


def output_error(layer, inputs: LayerInputs, target: torch.Tensor) -> float:
    out = layer(inputs.hidden, **inputs.kwargs)
    return F.mse_loss(out[0] if isinstance(out, tuple) else out, target).item()


@torch.no_grad()
@pytest.mark.parametrize("bits", [2, 3])
def test_signround_lowers_the_layer_output_error_below_gptqs(layer0, bits):
    model, inputs = layer0
    layer = model.model.layers[0]
    source = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        target = layer(inputs.hidden, **inputs.kwargs)
        target = target[0] if isinstance(target, tuple) else target
        delta = signround_targets(layer, inputs, batch_size=8)
        assert torch.allclose(delta + inputs.hidden, target, atol=1e-5)
        quant = QuantConfig(bits=bits, group_size=32, act_order=True, static_groups=True, mse=True,
                            method="signround", signround_iters=100)
        results = quantize_layer(layer, architecture_for({"model_type": "llama"}), inputs, quant, batch_size=8, where="layer 0",
                                 source=source)
        gptq_error = output_error(layer, inputs, target)
        refined = refine_layer(layer, results, inputs, delta, quant, source)
        signround_error = output_error(layer, inputs, target)
        print(f"{bits}-bit layer 0 output MSE: GPTQ {gptq_error:.3e}, SignRound {signround_error:.3e}")
        changed = sum(int((r.weight.intweight != g.weight.intweight).sum()) for r, g in zip(refined, results))
        if bits == 2:  # GPTQ is far from the target: SignRound must find a clearly better rounding
            assert signround_error < 0.9 * gptq_error and changed > 0
        else:  # this layer's 3-bit GPTQ is a point SignRound cannot improve: it must keep it exactly
            assert signround_error <= gptq_error
        for r in refined:  # the layer computes with exactly the weights that will be stored
            assert torch.equal(layer.get_submodule(r.name).weight, r.weight.dequantize())
            assert torch.equal(r.weight.g_idx.long(), torch.arange(r.weight.shape[1]) // 32)
    finally:
        layer.load_state_dict(source)


def test_signround_brings_the_model_closer_to_full_precision_than_gptq(tmp_path):
    """Judged by KL divergence and top-1 agreement to full precision: SignRound's own objective.
    (The bundled model's perplexity moves by noise at 2 bits, +-0.2%, and says nothing here.)"""
    base = dict(bits=2, group_size=32, act_order=True, static_groups=True)
    bundled = api.bundled_model_dir()
    calib = CalibrationConfig(nsamples=32, seqlen=128)
    quantpress.quantize(bundled, tmp_path / "gptq", QuantConfig(**base), calib)
    quantpress.quantize(bundled, tmp_path / "sr", QuantConfig(**base, method="signround"), calib)
    gptq = api.compare(quantpress.load(tmp_path / "gptq"), bundled, seqlen=128, max_windows=20)
    signround = api.compare(quantpress.load(tmp_path / "sr"), bundled, seqlen=128, max_windows=20)
    print(f"bundled 2-bit g32 KL / top-1: GPTQ {gptq.kl_divergence:.5f} / {gptq.top1:.4f}, "
          f"SignRound {signround.kl_divergence:.5f} / {signround.top1:.4f}")
    assert signround.kl_divergence < 0.95 * gptq.kl_divergence and signround.top1 >= gptq.top1
    config = json.loads((tmp_path / "sr" / "quantize_config.json").read_text())
    assert config["meta"]["method"] == "signround" and config["meta"]["signround_iters"] == 200
    assert config["meta"]["act_order"] is True
    assert config["quant_method"] == "gptq" and config["desc_act"] is False  # static: plain GPTQ for every loader


@pytest.mark.parametrize("target", ["layer", "model"])
def test_a_killed_signround_run_resumes_to_identical_files(tiny_llama, examples, tmp_path, target):
    quant = QuantConfig(bits=2, group_size=32, method="signround", signround_iters=5, signround_target=target)
    quantpress.quantize(tiny_llama, tmp_path / "ref", quant, CALIB, examples=examples)
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(tiny_llama, tmp_path / "q", quant, CALIB, examples=examples, progress=kill_at("layer", 1))
    assert quantpress.quantize(tiny_llama, tmp_path / "q", quant, CALIB, examples=examples).resumed_layers == 1
    assert digest(tmp_path / "q") == digest(tmp_path / "ref")


def test_signround_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="static_groups"):
        QuantConfig(method="signround", act_order=True)
    with pytest.raises(ConfigError, match="signround_iters"):
        QuantConfig(method="signround", signround_iters=0)
    with pytest.raises(ConfigError, match="calibration"):
        quantpress.quantize(api.bundled_model_dir(), "/tmp/never-written", QuantConfig(method="signround"), None)
