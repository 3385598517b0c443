"""`quantpress release` end to end on the bundled model, run as a real subprocess: a 3-variant
recipe gives a git repo with 3 branches whose cards match their files; a re-run reuses
everything; a release killed mid-variant resumes to the identical result, and no branch ever
points at an incomplete model."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import quantpress
from quantpress.api import bundled_model_dir
from quantpress.formats.gptq_config import read_format_info
from quantpress.release.card import human_size
from quantpress.release.git import GITATTRIBUTES, GitError, ReleaseRepo

EVAL_WINDOWS = 4
RECIPE = """
model:
  name: Tiny Llama
  creator: quantpress
  original_model: quantpress/tiny-llama
  license: cc-by-sa-3.0
  repo_id: quantpress/tiny-llama-GPTQ
defaults: {act_order: true, damp_percent: 0.1, dataset: wikitext2, nsamples: 32, seqlen: 256}
variants:
  - {main: true, bits: 4, group_size: 128, desc: "recommended"}
  - {bits: 3, group_size: 32, desc: "small | pipe in text"}
  - {bits: 8, group_size: -1, desc: "near lossless"}
"""
BRANCHES = {"main", "gptq-3bit-32g-actorder_True", "gptq-8bit--1g-actorder_True"}
# The files a complete variant has; a branch must never point at a tree missing any of them.
MODEL_FILES = {"model.safetensors", "config.json", "quantize_config.json", "quantize_log.json", "tokenizer.json",
               "tokenizer_config.json", ".gitattributes"}
CARD_FILES = {"README.md", "perplexity-vs-size.png"}


def release_command(repo: Path, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "quantpress.cli", "release", str(bundled_model_dir()), str(repo),
            "--recipe", str(recipe), "--eval-windows", str(EVAL_WINDOWS)]


def child_env() -> dict[str, str]:
    # Same thread count in every run: GEMM reductions split differently round differently.
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def run_release(repo: Path, recipe: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(release_command(repo, recipe), capture_output=True, text=True, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory, recipe) -> ReleaseRepo:
    repo = tmp_path_factory.mktemp("release") / "tiny-llama-GPTQ"
    run_release(repo, recipe)
    return ReleaseRepo(repo)


def branches_if_any(repo: ReleaseRepo) -> dict[str, str]:
    """The branches, or none while the release has not made its repository yet. (The repository
    appears complete or not at all, see git.py; this poll must not depend on that to be right.)"""
    try:
        return repo.branches()
    except GitError as e:
        if repo.git_dir.is_dir() and "not a git repository" not in str(e):
            raise
        return {}


def checkout(repo: ReleaseRepo, branch: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(repo.path), "archive", branch], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def safetensors_complete(data: bytes) -> bool:
    """The header parses and the data section is exactly as long as the header says."""
    if len(data) < 8:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return False
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return len(data) == 8 + n + end


def table(card: str, first_header: str) -> list[dict[str, str]]:
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().removeprefix("|").removesuffix("|").split(" | ")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_three_branches_each_complete_with_the_same_card(released):
    assert set(released.branches()) == BRANCHES
    cards = {released.read(b, "README.md") for b in BRANCHES}
    assert len(cards) == 1  # one card, identical on every branch
    for branch in BRANCHES:
        files = released.files(branch)
        assert MODEL_FILES | CARD_FILES <= set(files), branch
        assert released.read(branch, ".gitattributes").decode() == GITATTRIBUTES
        assert safetensors_complete(released.read(branch, "model.safetensors"))
        assert released.read(branch, "perplexity-vs-size.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # the working tree shows main, as a clone would
    assert (released.path / "README.md").read_bytes() == released.read("main", "README.md")
    assert not (released.path / ".git" / "quantpress" / "variants" / "main").exists()  # no leftovers


def test_card_tables_match_the_files_on_each_branch(released, tmp_path):
    card = released.read("main", "README.md").decode()
    provided = {row["Branch"].strip("`"): row for row in table(card, "Branch")}
    assert set(provided) == BRANCHES
    quality = {row["Branch"].strip("`"): row for row in table(card[card.index("## Measured quality"):], "Branch")}
    for branch in BRANCHES:
        files = released.files(branch)
        qc = json.loads(released.read(branch, "quantize_config.json"))
        info = read_format_info(json.loads(released.read(branch, "config.json")), qc)
        row = provided[branch]
        assert row["Bits"] == str(info.bits)
        assert row["GS"] == ("None" if info.group_size == -1 else str(info.group_size))
        static = qc["meta"]["act_order"] and not info.desc_act  # act-order, stored as plain groups
        assert row["Act Order"] == ("Yes" if info.desc_act else "Static" if static else "No")
        damp = "per module" if qc["meta"]["damp_search"] else str(qc["damp_percent"])
        assert row["Damp %"] == damp and row["Seq Len"] == str(qc["seqlen"])
        size = sum(n for name, n in files.items() if name.endswith(".safetensors"))
        assert row["Size"] == human_size(size)
        assert row["ExLlama"] == ("Yes" if info.bits == 4 else "No")
        # The perplexity in the card is what this branch's files give on the same windows.
        loaded = quantpress.load(checkout(released, branch, tmp_path / branch), exact=True)  # as `eval` loads
        ppl = quantpress.evaluate(loaded, "wikitext2", max_windows=EVAL_WINDOWS).perplexity
        assert quality[branch]["wikitext-2 perplexity"] == f"{ppl:.3f}"
        # ... and so are its KL and top-1 agreement to the full-precision source
        agreement = quantpress.api.compare(loaded, quantpress.bundled_model_dir(), max_windows=EVAL_WINDOWS)
        assert quality[branch]["KL to full precision"] == f"{agreement.kl_divergence:.4f}"
        assert quality[branch]["Top-1 agreement"] == f"{agreement.top1:.1%}"
    assert "small \\| pipe in text" in provided["gptq-3bit-32g-actorder_True"]["Desc"]
    assert "![Perplexity vs size](perplexity-vs-size.png)" in card


def test_rerun_of_an_unchanged_recipe_reuses_every_variant(released, recipe):
    before = released.branches()
    result = run_release(released.path, recipe)
    assert "0 variants quantized, 3 reused" in result.stderr
    assert released.branches() == before  # not even a new commit


def test_killed_release_resumes_to_the_identical_result(released, recipe, tmp_path):
    repo = ReleaseRepo(tmp_path / "killed")
    victim = "gptq-3bit-32g-actorder_True"
    progress = repo.work_dir / "variants" / f"{victim}.partial" / "progress.json"
    proc = subprocess.Popen(release_command(repo.path, recipe), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen_complete = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            # Every branch that exists at any moment points at a complete model.
            for branch, head in branches_if_any(repo).items():
                files = repo.files(head)
                assert MODEL_FILES <= set(files), (branch, sorted(files))
                assert safetensors_complete(repo.read(head, "model.safetensors"))
                seen_complete.add(branch)
            try:
                staged = json.loads(progress.read_text()).get("layers_done", 0)
            except (OSError, ValueError):
                staged = 0
            if staged >= 1:
                proc.send_signal(signal.SIGKILL)  # mid-variant: one of its four layers is staged
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the release finished before it could be interrupted"
    assert seen_complete == {"main"} and set(repo.branches()) == {"main"}

    run_release(repo.path, recipe)
    done = json.loads((repo.work_dir / "variants" / f"{victim}.done.json").read_text())
    assert done["resumed_layers"] >= 1  # the staged layer was reused, not redone
    assert set(repo.branches()) == BRANCHES
    for branch in BRANCHES:
        assert repo.tree_of(branch) == released.tree_of(branch), branch  # byte-identical files, card included


def test_publish_to_a_bare_remote_then_download_a_branch_from_it(released, tmp_path):
    bare = tmp_path / "hub.git"
    subprocess.run(["git", "init", "--bare", "--quiet", str(bare)], check=True)
    publish = subprocess.run([sys.executable, "-m", "quantpress.cli", "publish", str(released.path),
                              "--remote", str(bare)], capture_output=True, text=True)
    assert publish.returncode == 0, publish.stderr
    remote = subprocess.run(["git", "-C", str(bare), "for-each-ref", "--format=%(refname:short) %(objectname)"],
                            capture_output=True, text=True, check=True).stdout
    assert dict(line.split() for line in remote.splitlines()) == released.branches()

    branch = "gptq-8bit--1g-actorder_True"
    out = tmp_path / "downloaded"
    fetch = subprocess.run([sys.executable, "-m", "quantpress.cli", "download", f"file://{bare}:{branch}",
                            "--local-dir", str(out)], capture_output=True, text=True)
    assert fetch.returncode == 0, fetch.stderr
    for name in released.files(branch):
        assert (out / name).read_bytes() == released.read(branch, name), name
    assert quantpress.load(out).format_info.bits == 8


def test_branches_record_the_prompt_format_for_chat_and_serve(released):
    for branch in BRANCHES:
        meta = json.loads(released.read(branch, "quantize_config.json"))["meta"]
        assert (meta["prompt_template"], meta["system_prompt"]) == ("none", None)
