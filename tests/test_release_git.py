"""The release repository's git plumbing, with real git: complete commits only, linear history,
no empty commits, and publishing to a bare remote."""

from __future__ import annotations

import subprocess

import pytest

from quantpress.release.git import GITATTRIBUTES, GitError, ReleaseRepo


def files(tmp_path, **contents):
    out = {}
    for name, text in contents.items():
        p = tmp_path / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        out[name] = p
    return out


def test_commit_branch_writes_exact_tree_and_skips_unchanged(tmp_path):
    repo = ReleaseRepo.open_or_init(tmp_path / "repo")
    first = repo.commit_branch("main", files(tmp_path, **{"a.txt": "A", "model.safetensors": "W"}), "one")
    assert repo.branches() == {"main": first}
    assert repo.files(first) == {"a.txt": 1, "model.safetensors": 1}
    assert repo.read(first, "a.txt") == b"A"
    assert repo.commit_branch("main", files(tmp_path, **{"a.txt": "A", "model.safetensors": "W"}), "again") == first

    second = repo.commit_branch("main", files(tmp_path, **{"README.md": "card"}), "card", start_from=first)
    assert repo.files(second) == {"a.txt": 1, "model.safetensors": 1, "README.md": 4}
    parents = repo.git("rev-list", "--parents", "-n", "1", second).split()
    assert parents == [second, first]  # linear: a re-release fast-forwards on any remote


def test_repo_is_marked_for_lfs_and_refuses_foreign_folder(tmp_path):
    repo = ReleaseRepo.open_or_init(tmp_path / "repo")
    assert (repo.git_dir / "info" / "attributes").read_text() == GITATTRIBUTES
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in GITATTRIBUTES.splitlines()
    assert repo.work_dir.is_relative_to(repo.git_dir)  # never committed, never pushed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(GitError, match="not a git repository"):
        ReleaseRepo.open_or_init(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_push_all_branches_to_a_bare_remote(tmp_path):
    repo = ReleaseRepo.open_or_init(tmp_path / "repo")
    heads = {b: repo.commit_branch(b, files(tmp_path, **{"f": b}), b) for b in ("main", "gptq-4bit-128g-actorder_True")}
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--bare", "--quiet", str(bare)], check=True)
    repo.push(str(bare))
    remote = subprocess.run(["git", "-C", str(bare), "for-each-ref", "--format=%(refname:short) %(objectname)"],
                            capture_output=True, text=True, check=True).stdout
    assert dict(line.split() for line in remote.splitlines()) == heads

    # A diverged remote is refused without --force and overwritten with it.
    other = ReleaseRepo.open_or_init(tmp_path / "other")
    other.commit_branch("main", files(tmp_path, **{"f": "different"}), "x")
    with pytest.raises(GitError, match="push"):
        other.push(str(bare))
    other.push(str(bare), force=True)
    assert subprocess.run(["git", "-C", str(bare), "rev-parse", "main"], capture_output=True, text=True,
                          check=True).stdout.strip() == other.branches()["main"]
