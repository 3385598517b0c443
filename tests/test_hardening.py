"""Issue 11: quantize/eval/generate/chat/serve as a hostile or unlucky user drives them.

No code from a model folder ever runs, nothing is ever prompted, an output never lands in or over
anything quantpress did not write, every check runs before the work, and a run killed at any
step of publishing its output resumes to the identical result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import QUANTPRESS, run

import quantpress
from quantpress import CalibrationConfig, QuantConfig
from quantpress.errors import CalibrationError, CheckpointError, ConfigError, OutputExistsError
from quantpress.staging import PUBLISH_STEPS

RTN = QuantConfig(bits=4, group_size=32, method="rtn")
GPTQ = QuantConfig(bits=4, group_size=32)
CALIB = CalibrationConfig(nsamples=4, seqlen=32)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal digests, identical trees."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_traceback(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 2 and "Traceback" not in result.stderr and "error" in result.stderr.lower()


@pytest.fixture
def model(tmp_path, tiny_llama) -> Path:
    return shutil.copytree(tiny_llama, tmp_path / "model")


# --- 1. no code from a model folder, never a prompt ------------------------------------------

@pytest.fixture
def remote_code_model(model, tmp_path) -> tuple[Path, Path]:
    """A model whose tokenizer_config maps AutoTokenizer to its own evil.py, which leaves a mark."""
    mark = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTok", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model, mark


@pytest.mark.parametrize("command", [
    ["chat"],
    ["generate", "--prompt", "t5 t6", "--max-new-tokens", "2"],
    ["eval", "--max-windows", "1"],
    ["quantize", "{out}", "--nsamples", "4", "--seqlen", "32", "--no-eval"],
    ["serve", "--port", "1"],
])
def test_folder_code_never_runs_even_when_the_user_says_yes(remote_code_model, tmp_path, command):
    folder, mark = remote_code_model
    args = [a.replace("{out}", str(tmp_path / "q")) for a in command]
    result = subprocess.run([*QUANTPRESS, args[0], str(folder), *args[1:]], input="yes\ny\nt5 t6\n",
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not mark.exists(), "evil.py was imported"
    assert no_traceback(result), result.stderr
    assert "auto_map" in result.stderr and "evil.EvilTok" in result.stderr
    assert not (tmp_path / "q").exists()


def test_a_config_json_auto_map_is_refused_too(model):
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="modeling_evil.EvilForCausalLM"):
        quantpress.load(model)


# --- 2. never into the source, never over what quantpress did not write -----------------------

def test_quantize_never_writes_into_or_over_its_source(model):
    before = digest(model.parent)
    for out in (model, model.parent, model / "sub"):
        with pytest.raises(ConfigError, match="model folder"):
            quantpress.quantize(model, out, RTN, None, overwrite=True)
    result = run("quantize", model, model, "--overwrite", "--method", "rtn", "--no-eval")
    assert no_traceback(result) and "model folder" in result.stderr
    assert digest(model.parent) == before  # nothing deleted, nothing added (no .partial either)


def test_calibration_text_is_an_input_too(model, tmp_path):
    text = tmp_path / "calib"
    text.mkdir()
    (text / "keep.txt").write_text("t5 t6")
    with pytest.raises(ConfigError, match="calibration text"):
        quantpress.quantize(model, text, GPTQ, CalibrationConfig(str(text / "keep.txt"), 4, 32), overwrite=True)
    assert (text / "keep.txt").read_text() == "t5 t6"


def test_overwrite_replaces_only_a_folder_quantpress_wrote(model, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not a quantized model quantpress wrote"):
        quantpress.quantize(model, foreign, RTN, None, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work"

    ours = tmp_path / "q"
    quantpress.quantize(model, ours, RTN, None)
    (ours / "notes.txt").write_text("my notes")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        quantpress.quantize(model, ours, RTN, None, overwrite=True)
    assert (ours / "notes.txt").read_text() == "my notes"

    (ours / "notes.txt").unlink()
    other_tool = json.loads((ours / "quantize_config.json").read_text())
    other_tool["meta"]["quantizer"] = ["gptqmodel:4.0"]
    (ours / "quantize_config.json").write_text(json.dumps(other_tool))
    with pytest.raises(OutputExistsError, match="another tool"):
        quantpress.quantize(model, ours, RTN, None, overwrite=True)

    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(OutputExistsError):
        quantpress.quantize(model, link, RTN, None, overwrite=True)
    assert (foreign / "thesis.tex").exists()


def test_overwrite_of_our_own_output_still_works(model, tmp_path):
    out = tmp_path / "q"
    quantpress.quantize(model, out, QuantConfig(bits=8, group_size=32, method="rtn"), None)
    quantpress.quantize(model, out, RTN, None, overwrite=True)
    quantpress.quantize(model, tmp_path / "fresh", RTN, None)
    assert digest(out) == digest(tmp_path / "fresh")


def test_a_foreign_partial_folder_is_not_discarded(model, tmp_path):
    partial = tmp_path / "q.partial"
    partial.mkdir()
    (partial / "draft.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not made by quantpress"):
        quantpress.quantize(model, tmp_path / "q", RTN, None)
    assert (partial / "draft.txt").read_text() == "keep me"


# --- 5. a kill at any step of publishing resumes ------------------------------------------------

def kill_at(stage: str, step: int):
    """A progress callback that stops the run like a kill once `stage` reaches `step`."""
    def progress(name: str, done: int, total: int) -> None:
        if name == stage and done == step:
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("step", range(1, PUBLISH_STEPS + 1))
def test_a_kill_at_every_publish_step_resumes_to_the_identical_output(model, tmp_path, step, replacing):
    quantpress.quantize(model, tmp_path / "ref", RTN, None)
    expected = digest(tmp_path / "ref")
    out = tmp_path / "out"
    if replacing:
        quantpress.quantize(model, out, QuantConfig(bits=8, group_size=32, method="rtn"), None)
    old = digest(out) if replacing else None

    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(model, out, RTN, None, overwrite=replacing, progress=kill_at("publish", step))
    # never half-written: the old output, the new one, or (mid-replacement) none at all
    assert (digest(out) if out.exists() else None) in ([old, None] if step < 3 else [expected])

    if out.exists() and not replacing:  # published before the kill: the same command says so
        with pytest.raises(OutputExistsError):
            quantpress.quantize(model, out, RTN, None)
    else:
        quantpress.quantize(model, out, RTN, None, overwrite=replacing)
    assert digest(out) == expected
    assert not (tmp_path / "out.partial").exists()


def test_a_kill_while_assembling_redoes_only_the_assembly(model, tmp_path, examples):
    quantpress.quantize(model, tmp_path / "ref", GPTQ, CALIB, examples=examples)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(model, out, GPTQ, CALIB, examples=examples, progress=kill_at("layer", 2))
    final = tmp_path / "out.partial" / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"half a file")  # as a kill mid-write leaves it
    report = quantpress.quantize(model, out, GPTQ, CALIB, examples=examples)
    assert report.resumed_layers == 2
    assert digest(out) == digest(tmp_path / "ref")


def test_the_old_wedge_a_kill_after_staged_layers_were_dropped(model, tmp_path):
    """The bug as reported: staged layers deleted, folder not yet renamed, every re-run failed."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantpress.quantize(model, out, RTN, None, progress=kill_at("publish", 1))
    shutil.rmtree(tmp_path / "out.partial" / "layers")
    quantpress.quantize(model, out, RTN, None)
    quantpress.quantize(model, tmp_path / "ref", RTN, None)
    assert digest(out) == digest(tmp_path / "ref")


# --- 9/10. clear errors, before any work --------------------------------------------------------

def test_missing_tokenizer_fails_before_any_work(model, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        quantpress.quantize(model, tmp_path / "q", GPTQ, CALIB)
    assert not (tmp_path / "q.partial").exists()


def test_unwritable_output_location_fails_before_any_work(model, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run("quantize", model, tmp_path / "a-file" / "q", "--method", "rtn")  # eval on: must not start
    assert no_traceback(result) and "is a file" in result.stderr and "perplexity" not in result.stderr
    if os.access("/sys", os.W_OK) and not Path("/sys/fs").is_dir():
        return
    with pytest.raises(ConfigError, match="cannot write"):
        quantpress.quantize(model, "/sys/quantpress-out", RTN, None)


def test_existing_output_is_reported_before_the_full_precision_evaluation(model, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "x").write_text("")
    result = run("quantize", model, tmp_path / "q", "--method", "rtn")
    assert no_traceback(result) and "already exists" in result.stderr and "perplexity" not in result.stderr


@pytest.mark.parametrize("break_it, message", [
    (lambda m: (shutil.rmtree(m), m.write_text("")), "config.json"),
    (lambda m: (m / "config.json").write_text("[1, 2]"), "JSON object"),
])
def test_broken_model_folders_give_clear_errors(model, tmp_path, break_it, message):
    break_it(model)
    result = run("quantize", model, tmp_path / "q", "--no-eval")
    assert no_traceback(result) and message in result.stderr


def test_dataset_that_is_a_folder_fails_before_any_work(model, tmp_path):
    with pytest.raises(CalibrationError, match="a folder"):
        quantpress.quantize(model, tmp_path / "q", GPTQ, CalibrationConfig(str(tmp_path), 4, 32))
    result = run("quantize", model, tmp_path / "q", "--dataset", tmp_path, "--no-eval")
    assert no_traceback(result) and "a folder" in result.stderr


def test_unsupported_tensor_dtype_is_found_before_quantizing(model, tmp_path):
    tensors = load_file(model / "model.safetensors")
    tensors["model.extra_counts"] = torch.zeros(4, dtype=torch.uint16)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    calls = []
    with pytest.raises(CheckpointError, match="U16"):
        quantpress.quantize(model, tmp_path / "q", RTN, None, progress=lambda *a: calls.append(a))
    assert calls == [] and not (tmp_path / "q.partial").exists()


def test_output_dot_is_the_current_folder_and_is_not_ours(model, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2")
    for extra in ([], ["--overwrite"]):
        result = run("quantize", model, ".", "--method", "rtn", "--no-eval", *extra, cwd=work)
        assert no_traceback(result), result.stderr
    assert digest(work) == {"data.csv": hashlib.sha256(b"1,2").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "work"]


def test_a_leftover_old_folder_does_not_block_overwrite(model, tmp_path):
    out = tmp_path / "q"
    quantpress.quantize(model, out, RTN, None)
    (tmp_path / "q.old").mkdir()
    (tmp_path / "q.old" / "mine.txt").write_text("not quantpress's")
    quantpress.quantize(model, out, RTN, None, overwrite=True)
    assert (tmp_path / "q.old" / "mine.txt").read_text() == "not quantpress's"


# --- 11. numbers validated at the edge ----------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["eval", "{model}", "--seqlen", "-5"],
    ["eval", "{model}", "--max-windows", "0"],
    ["eval", "{model}", "--max-windows", "-1"],
    ["generate", "{model}", "--prompt", "t5", "--seed", "1e23"],
    ["generate", "{model}", "--prompt", "t5", "--seed", str(10**23)],
    ["generate", "{model}", "--prompt", "t5", "--max-new-tokens", "0"],
])
def test_out_of_range_numbers_are_refused_at_the_command_line(model, args):
    result = run(*[a.replace("{model}", str(model)) for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Invalid value" in result.stderr


def test_evaluate_validates_its_numbers(model):
    with pytest.raises(ConfigError, match="max_windows"):
        quantpress.evaluate(model, max_windows=0)
    with pytest.raises(ConfigError, match="seqlen"):
        quantpress.evaluate(model, seqlen=-5)


def test_sampling_params_refuse_seeds_a_generator_cannot_take():
    from quantpress.runtime.sampling import MAX_SEED, SamplingParams

    assert SamplingParams(seed=MAX_SEED).seed == MAX_SEED
    for seed in (-1, MAX_SEED + 1, 10**23):
        with pytest.raises(ConfigError, match="seed"):
            SamplingParams(seed=seed)

