"""Bad input gets a clear error and leaves nothing that looks finished; interrupted runs resume."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantpress
from quantpress import CalibrationConfig, QuantConfig
from quantpress.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    HessianNotPositiveDefinite,
    NonFiniteError,
    OutputExistsError,
    UnsupportedArchitecture,
)

QUANT = QuantConfig(bits=4, group_size=32, act_order=True)
CALIB = CalibrationConfig(nsamples=8, seqlen=64)


@pytest.fixture
def model_copy(tmp_path, tiny_llama):
    return shutil.copytree(tiny_llama, tmp_path / "src")


def assert_nothing_finished(out):
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert not (partial / "config.json").exists() and not (partial / "model.safetensors").exists()


def interrupt_after(layers: int):
    """A progress callback that stops the run like Ctrl-C once `layers` layers are done."""
    def progress(stage: str, done: int, total: int) -> None:
        if done == layers:
            raise KeyboardInterrupt
    return progress


def test_interrupted_run_resumes_to_identical_output(tmp_path, tiny_llama, examples):
    reference = quantpress.quantize(tiny_llama, tmp_path / "ref", QUANT, CALIB, examples=examples)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples, progress=interrupt_after(1))
    assert_nothing_finished(out)

    resumed = quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples)
    assert resumed.resumed_layers == 1
    assert load_file(out / "model.safetensors").keys() == load_file(reference.out_dir / "model.safetensors").keys()
    for name, tensor in load_file(reference.out_dir / "model.safetensors").items():
        assert torch.equal(load_file(out / "model.safetensors")[name], tensor), name
    assert not out.with_name("out.partial").exists()
    log = json.loads((out / "quantize_log.json").read_text())
    assert log == json.loads((reference.out_dir / "quantize_log.json").read_text())  # layer 0 survived the resume
    assert [m["name"] for m in log][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_staging_from_other_settings_is_discarded(tmp_path, tiny_llama, examples):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples, progress=interrupt_after(1))
    report = quantpress.quantize(tiny_llama, out, QuantConfig(bits=3, group_size=32), CALIB, examples=examples)
    assert report.resumed_layers == 0
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 3


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, tiny_llama, examples):
    out = quantpress.quantize(tiny_llama, tmp_path / "out", QUANT, CALIB, examples=examples).out_dir
    with pytest.raises(OutputExistsError):
        quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples)
    report = quantpress.quantize(tiny_llama, out, QuantConfig(bits=8), CALIB, examples=examples, overwrite=True)
    assert json.loads((report.out_dir / "quantize_config.json").read_text())["bits"] == 8


def test_truncated_weights_name_the_file(tmp_path, model_copy, examples):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        quantpress.quantize(model_copy, tmp_path / "out", QUANT, CALIB, examples=examples)
    with pytest.raises(CheckpointError, match="truncated"):
        quantpress.load(model_copy)
    assert_nothing_finished(tmp_path / "out")


def test_unsupported_architecture_lists_supported_ones(tmp_path, model_copy, examples):
    config = json.loads((model_copy / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'.*supported: llama, mistral, qwen2"):
        quantpress.quantize(model_copy, tmp_path / "out", QUANT, CALIB, examples=examples)
    assert_nothing_finished(tmp_path / "out")


def test_mixed_attention_layer_types_are_refused(tmp_path, tiny_qwen2, examples):
    src = shutil.copytree(tiny_qwen2, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="mix attention types"):
        quantpress.quantize(src, tmp_path / "out", QUANT, CALIB, examples=examples)


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, model_copy, examples):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="layer 1.*mlp.up_proj.weight"):
        quantpress.quantize(model_copy, tmp_path / "out", QUANT, CALIB, examples=examples)
    assert_nothing_finished(tmp_path / "out")


def test_empty_calibration_file(tmp_path, tiny_llama):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="contains no text"):
        quantpress.quantize(tiny_llama, tmp_path / "out", QUANT, CalibrationConfig(str(empty), 8, 64))
    short = tmp_path / "short.txt"
    short.write_text("t4 t5 t6")
    with pytest.raises(CalibrationError, match="has 3 tokens"):
        quantpress.quantize(tiny_llama, tmp_path / "out", QUANT, CalibrationConfig(str(short), 8, 64))
    assert_nothing_finished(tmp_path / "out")


def test_calibration_longer_than_the_model_allows(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 256"):
        quantpress.quantize(tiny_llama, tmp_path / "out", QUANT, CalibrationConfig(nsamples=2, seqlen=512))


@pytest.fixture
def small_disk(tmp_path):
    """A real 320 KiB filesystem (tmpfs), so writes fail with a genuine ENOSPC. Needs root."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # tracebacks may still hold mmaps


def test_full_disk_loses_nothing_and_resumes(tmp_path, tiny_llama, examples, small_disk):
    out = small_disk / "out"
    with pytest.raises(OSError) as info:
        quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples)
    assert info.value.errno == errno.ENOSPC
    assert_nothing_finished(out)
    partial = out.with_name("out.partial")
    assert not list(partial.rglob("*.tmp"))  # failed writes leave no debris
    staged = json.loads((partial / "progress.json").read_text())["layers_done"]
    assert staged >= 1  # the layers finished before the disk filled are kept

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # "free some space"
    report = quantpress.quantize(tiny_llama, out, QUANT, CALIB, examples=examples)
    assert report.resumed_layers == staged
    reference = quantpress.quantize(tiny_llama, tmp_path / "ref", QUANT, CALIB, examples=examples)
    assert (out / "model.safetensors").read_bytes() == (reference.out_dir / "model.safetensors").read_bytes()


def test_a_hessian_that_cannot_be_factored_names_layer_and_module(tmp_path, model_copy, examples):
    # A norm weight of 1e20 makes q/k/v's inputs ~1e20, so their fp32 Hessian overflows to inf:
    # no damping can rescue it, and the error must say where it happened.
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.input_layernorm.weight"].fill_(1e20)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises((HessianNotPositiveDefinite, NonFiniteError), match=r"model\.layers\.1\.self_attn\.q_proj"):
        quantpress.quantize(model_copy, tmp_path / "out", QUANT, CALIB, examples=examples)
    assert_nothing_finished(tmp_path / "out")
