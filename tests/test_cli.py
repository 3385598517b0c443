"""The `quantpress` command as a user runs it: a real subprocess, real files, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import quantpress

QUANTPRESS = [sys.executable, "-m", "quantpress.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*QUANTPRESS, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_unknown_prompt_template_fails_before_any_work(tmp_path, tiny_llama):
    result = run("quantize", tiny_llama, tmp_path / "q", "--prompt-template", "vicunya", "--no-eval")
    assert result.returncode == 2 and "unknown prompt template 'vicunya'" in result.stderr
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_quantize_eval_generate_on_a_folder(tmp_path, tiny_llama):
    out = tmp_path / "q"
    # The tiny test model's tokenizer knows only "t4".."t255": calibrate on such a text file.
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{4 + (i * 7) % 250}" for i in range(4000)))
    result = run("quantize", tiny_llama, out, "--bits", "3", "--group-size", "64", "--act-order",
                 "--dataset", text, "--nsamples", "4", "--seqlen", "32", "--no-eval", "--prompt-template", "vicuna")
    assert result.returncode == 0, result.stderr
    assert "gptq-3bit-64g-actorder_True" in result.stdout and "size on disk" in result.stdout
    assert json.loads((out / "quantize_config.json").read_text())["meta"]["prompt_template"] == "vicuna"
    assert "2/2" in result.stderr  # the per-layer progress bar reached both layers
    config = json.loads((out / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["desc_act"], config["nsamples"], config["seqlen"]) == (3, 64, False, 4, 32)
    # options left open took the recommended levers; act-order with static groups needs no desc_act
    meta = config["meta"]
    assert (meta["act_order"], meta["static_groups"], meta["mse_weighted"], meta["damp_search"]) == (True,) * 4

    result = run("eval", out, "--dataset", text, "--seqlen", "64")
    assert result.returncode == 0, result.stderr
    assert re.search(r"perplexity: \d+\.\d{4} \(seqlen 64, \d+ windows", result.stdout)

    result = run("generate", out, "--prompt", "t10 t11", "--max-new-tokens", "5", "--seed", "1", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("t10 t11") and "finish_reason=" in result.stderr


def test_user_errors_exit_2_with_one_clear_line(tmp_path, tiny_llama):
    result = run("quantize", tiny_llama, tmp_path / "q", "--bits", "5")
    assert result.returncode == 2 and "error: bits must be one of (2, 3, 4, 8), got 5" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("eval", tmp_path / "missing")
    assert result.returncode == 2 and "model folder not found" in result.stderr


@pytest.mark.skipif(not (quantpress.bundled_model_dir() / "model.safetensors").exists(), reason="bundled model not built")
def test_readme_main_command_on_the_bundled_model(tmp_path):
    """`quantpress quantize` with no arguments: the README's first command, with a smaller calibration."""
    result = run("quantize", "--nsamples", "16", "--eval-windows", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before = float(re.search(r"ppl before \(seqlen \d+\)\s+│\s+([\d.]+)", result.stdout).group(1))
    after = float(re.search(r"ppl after\s+│\s+([\d.]+)", result.stdout).group(1))
    # 4-bit g128 barely moves a small model's perplexity (on 8 windows it may even improve it).
    assert abs(after / before - 1) < 0.02
    assert (tmp_path / "quantpress-out" / "tiny-llama-gptq-4bit-128g-actorder_True" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "quantpress-out")
