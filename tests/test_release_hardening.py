"""`release` refuses what it must not touch before any work: a folder or repository quantpress
did not make, an output overlapping its inputs, a recipe that does not type-check. And no model
loader in release/ may run code from a model folder."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantpress.api import bundled_model_dir
from quantpress.errors import ConfigError, OutputExistsError
from quantpress.release import build
from quantpress.release.build import release
from quantpress.release.recipe import parse_recipe

RECIPE = parse_recipe({"model": {"name": "M", "creator": "c", "original_model": "org/m"},
                       "variants": [{"main": True, "bits": 8, "nsamples": 8, "seqlen": 64}]}, seqlen_default=64)


@pytest.fixture
def no_work(monkeypatch):
    """Any step past the checks fails the test: tokenizing, merging, evaluating, quantizing."""
    def started(*args, **kwargs):
        raise AssertionError("the release started working before refusing")

    for name in ("_calibration_sets", "evaluate", "quantize", "quantize_shared"):
        monkeypatch.setattr(build, name, started)
    monkeypatch.setattr("quantpress.release.lora.merge_lora", started)


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), "-c", "user.name=u", "-c", "user.email=u@x", *args],
                          capture_output=True, text=True, check=True).stdout


def test_release_into_someone_elses_repository_is_refused_before_any_work(tmp_path, no_work):
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q", "--initial-branch=main")
    (project / "code.py").write_text("v1\n")
    git(project, "add", "code.py")
    git(project, "commit", "-qm", "v1")
    (project / "code.py").write_text("v2: uncommitted work\n")
    refs = git(project, "for-each-ref")

    with pytest.raises(OutputExistsError, match="not a release repository quantpress wrote"):
        release(bundled_model_dir(), project, RECIPE)
    assert git(project, "for-each-ref") == refs and (project / "code.py").read_text() == "v2: uncommitted work\n"
    assert not (project / ".git" / "quantpress").exists()


def test_release_into_a_folder_with_files_is_refused(tmp_path, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        release(bundled_model_dir(), out, RECIPE)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["model itself", "inside model", "contains model", "adapter", "inside adapter"])
def test_release_overlapping_its_inputs_is_refused_before_any_work(tmp_path, no_work, where):
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    for f in bundled_model_dir().iterdir():
        (model / f.name).symlink_to(f)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = {"model itself": model, "inside model": model / "release", "contains model": tmp_path / "models",
           "adapter": adapter, "inside adapter": adapter / "release"}[where]
    with pytest.raises(ConfigError, match="choose"):
        release(model, out, RECIPE, merge_lora=adapter)
    assert not (model / ".git").exists() and not (model / "release").exists() and not (adapter / "release").exists()
    assert not (tmp_path / "models" / ".git").exists() and list(adapter.iterdir()) == []


def test_a_recipe_with_a_string_boolean_stops_the_cli_before_anything_is_written(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: M, creator: c, original_model: org/m}\n"
                      "variants: [{main: true, bits: 8, act_order: 'false', nsamples: 4, seqlen: 32}]\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "quantpress.cli", "release", str(bundled_model_dir()), str(out),
                             "--recipe", str(recipe), "--eval-windows", "1"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "variants[0].act_order: expected true or false, got 'false'" in result.stdout + result.stderr
    assert not out.exists()


def test_every_transformers_loader_in_release_refuses_folder_code():
    """`from_pretrained` without trust_remote_code=False *asks on stdin* whether to run a model
    folder's code; every call in release/ must say no explicitly. (peft's PeftModel.from_pretrained
    loads no code and takes no such argument; it is only reached for LoRA adapters.)"""
    calls = []
    for path in Path(build.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                owner = ast.unparse(node.func.value)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, owner))
                if owner != "peft.PeftModel":
                    assert keywords.get("trust_remote_code") == "False", (path.name, node.lineno, owner)
    assert ("lora.py", "AutoModelForCausalLM") in calls


def test_publish_pushes_only_a_release_quantpress_wrote(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q", "--initial-branch=main")
    git(project, "commit", "-q", "--allow-empty", "-m", "private history")
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    result = subprocess.run([sys.executable, "-m", "quantpress.cli", "publish", str(project), "--remote", str(remote)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a release quantpress wrote" in result.stderr
    assert git(remote, "for-each-ref") == ""  # nothing pushed
