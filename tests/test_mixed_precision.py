"""Per-module precision (issue 12): the worst modules at 8 bits under a size budget, written in
GPTQModel's `dynamic` form, read back by quantpress and by GPTQModel itself."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_hardening import digest, kill_at
from test_interop_gptqmodel import logits_of, max_abs, needs_peer

import quantpress
from peers import regenerate_fixtures as regen
from peers import tiny_models
from quantpress import CalibrationConfig, QuantConfig
from quantpress.errors import ConfigError
from quantpress.mixed_precision import Candidate, choose_upgrades, dynamic_overrides
from quantpress.runtime.qlinear import QuantLinear

CALIB = CalibrationConfig(nsamples=8, seqlen=64)
# GPTQModel's own loader runs TorchLinear in fp16 only, so its whole forward is fp16 against our
# fp32; decoding a module at the wrong bit width moves these logits by > 3 (test_interop_gptqmodel).
FP16_FORWARD_ATOL = 0.1


def test_upgrades_go_to_the_largest_error_drop_per_byte_within_the_budget():
    candidates = [Candidate("a", 100.0, 1.0, 1000, 1000), Candidate("b", 50.0, 1.0, 1000, 1000),
                  Candidate("c", 10.0, 1.0, 1000, 100), Candidate("d", 1.0, 2.0, 1000, 10)]
    # 10% of 4000 base bytes = 400: only c fits (d gets worse at 8 bits: never chosen)
    assert choose_upgrades(candidates, 0.1) == ["c"]
    assert choose_upgrades(candidates, 0.3) == ["a", "c"]  # a: 0.099 per byte, c: 0.09, b: 0.049
    assert choose_upgrades(candidates, 0.0) == []
    assert dynamic_overrides(["model.layers.1.mlp.down_proj"]) == {
        r"+:^model\.layers\.1\.mlp\.down_proj$": {"bits": 8}}


def test_budget_settings_that_cannot_work_are_refused():
    for bad in (dict(upgrade_budget=1.0), dict(upgrade_budget=-0.1), dict(upgrade_budget=0.1, bits=8),
                dict(upgrade_budget=0.1, method="rtn")):
        with pytest.raises(ConfigError, match="upgrade_budget"):
            QuantConfig(**bad)


@pytest.fixture(scope="module")
def mixed(tiny_llama, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "q"
    report = quantpress.quantize(tiny_llama, out, QuantConfig(bits=3, group_size=32, upgrade_budget=0.3), CALIB,
                                 examples=examples)
    return out, report


def test_upgraded_modules_are_stored_at_8_bits_and_named_in_dynamic(mixed):
    out, report = mixed
    assert report.upgraded, "a 30% budget upgrades something on the tiny model"
    config = json.loads((out / "quantize_config.json").read_text())
    assert config["dynamic"] == dynamic_overrides(report.upgraded)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"] == config["dynamic"]
    tensors = load_file(out / "model.safetensors")
    for name in (n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")):
        in_features = tensors[f"{name}.g_idx"].numel()
        bits = 8 if name in report.upgraded else 3
        assert tensors[f"{name}.qweight"].shape[0] == in_features * bits // 32, name
        assert any(re.match(p.removeprefix("+:"), name) for p in config["dynamic"]) == (name in report.upgraded)
    extra = sum(m.extra_bytes for m in report.modules if m.name in report.upgraded)
    assert 0 < extra <= 0.3 * sum(m.base_bytes for m in report.modules)
    assert all(m.upgrade_error < m.error for m in report.modules if m.name in report.upgraded)


def test_quantpress_loads_the_mixed_checkpoint_with_each_modules_bits(mixed):
    out, report = mixed
    model = quantpress.load(out).model
    for name in report.upgraded:
        assert model.get_submodule(name).bits == 8
    plain = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in report.upgraded]
    assert plain and all(model.get_submodule(n).bits == 3 for n in plain)
    assert torch.isfinite(logits_of(model, tiny_models.eval_ids(1, 32, 0))).all()


def test_a_killed_mixed_run_resumes_to_identical_files(tiny_llama, examples, tmp_path):
    out = tmp_path / "q"
    quant = QuantConfig(bits=3, group_size=32, upgrade_budget=0.3)
    quantpress.quantize(tiny_llama, tmp_path / "ref", quant, CALIB, examples=examples)
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(tiny_llama, out, quant, CALIB, examples=examples, progress=kill_at("layer", 1))
    assert quantpress.quantize(tiny_llama, out, quant, CALIB, examples=examples).resumed_layers == 1
    assert digest(out) == digest(tmp_path / "ref")


@pytest.mark.peer
@needs_peer
def test_gptqmodel_reads_the_dynamic_overrides(tiny_llama, tmp_path):
    calib_ids = load_file(str(regen.FIXTURES_DIR / "calibration.safetensors"))["input_ids"]
    out = tmp_path / "mixed"
    report = quantpress.quantize(tiny_llama, out, QuantConfig(bits=4, group_size=32, damp_percent=regen.DAMP,
                                                              upgrade_budget=0.3),
                                 CalibrationConfig(nsamples=calib_ids.shape[0], seqlen=calib_ids.shape[1]),
                                 examples=calib_ids)
    assert report.upgraded
    ids_file = regen.write_ids(tmp_path / "input_ids.safetensors", tiny_models.eval_ids(
        regen.EVAL_N, regen.EVAL_SEQLEN, regen.EVAL_SEED))
    meta = regen.gptqmodel_logits(regen.require_peer_python(), out, ids_file, tmp_path / "logits.safetensors",
                                  native=True)
    assert meta["forward_dtype"] == "torch.float16", meta
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    ours = logits_of(quantpress.load(out, dtype=torch.float32, exact=True).model,
                     load_file(str(ids_file))["input_ids"])
    print("max |logit difference| vs GPTQModel fp16:", max_abs(ours, theirs))
    assert max_abs(ours, theirs) <= FP16_FORWARD_ATOL
