"""The release repository's git plumbing, with real git: complete commits only, linear history,
no empty commits, and publishing to a bare remote."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from quantpress.errors import ConfigError, OutputExistsError
from quantpress.release import git as release_git
from quantpress.release.git import GITATTRIBUTES, MARK, GitError, ReleaseRepo


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
    with pytest.raises(OutputExistsError, match="not a release repository quantpress wrote .*keep.txt"):
        ReleaseRepo.open_or_init(foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"] and (foreign / "keep.txt").read_text() == "mine"


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


def git_out(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), "-c", "user.name=u", "-c", "user.email=u@x", *args],
                          capture_output=True, text=True, check=True).stdout


def repo_state(path: Path) -> dict[str, str]:
    return {"refs": git_out(path, "for-each-ref"), "status": git_out(path, "status", "--porcelain"),
            "code": (path / "code.py").read_text()}


def user_repo(path: Path) -> dict[str, str]:
    """Someone's own project: a commit, and uncommitted work. Returns its state to compare with."""
    path.mkdir()
    git_out(path, "init", "-q", "--initial-branch=main")
    (path / "code.py").write_text("print('v1')\n")
    git_out(path, "add", "code.py")
    git_out(path, "commit", "-qm", "v1")
    (path / "code.py").write_text("print('v2, not committed yet')\n")
    return repo_state(path)


# --- finding 2: a release only ever writes into a repository quantpress made --------------------

def test_an_existing_repository_that_is_not_a_release_is_refused(tmp_path):
    project = tmp_path / "project"
    before = user_repo(project)
    with pytest.raises(OutputExistsError, match=f"without quantpress's mark `{MARK}`"):
        ReleaseRepo.open_or_init(project)
    assert repo_state(project) == before
    assert not (project / ".git" / "quantpress").exists()


def test_a_release_repository_reopens_and_an_empty_folder_is_used(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    repo = ReleaseRepo.open_or_init(empty)
    assert repo.git("config", "--bool", MARK).strip() == "true"
    head = repo.commit_branch("main", files(tmp_path, **{"f": "x"}), "one")
    assert ReleaseRepo.open_or_init(empty).branches() == {"main": head}
    file = tmp_path / "a-file"
    file.write_text("mine")
    with pytest.raises(OutputExistsError):
        ReleaseRepo.open_or_init(file)
    assert file.read_text() == "mine"


def test_a_missing_git_dir_never_falls_through_to_a_parent_repository(tmp_path):
    project = tmp_path / "project"
    user_repo(project)
    inside = ReleaseRepo(project / "release")  # constructed directly, as `publish` does
    (project / "release").mkdir()
    with pytest.raises(GitError):
        inside.branches()  # git would otherwise answer with the project's branches


# --- finding 12: a reader never sees a half-made repository --------------------------------------

def test_the_repository_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    """At every git command open_or_init runs, `<path>/.git` is either absent or a complete,
    marked release repository, so a poll (a second run, a test) can never catch it half-made."""
    target = tmp_path / "repo"
    real_run = subprocess.run
    observed: list[str] = []

    def state() -> str:
        git_dir = target / ".git"
        if not git_dir.exists():
            return "absent"
        heads = real_run(["git", f"--git-dir={git_dir}", "for-each-ref"], capture_output=True, check=False)
        mark = real_run(["git", "config", "--file", str(git_dir / "config"), "--get", MARK], capture_output=True,
                        text=True, check=False).stdout.strip()
        attributes = (git_dir / "info" / "attributes").is_file()
        return "complete" if heads.returncode == 0 and mark == "true" and attributes else "half-made"

    def spying_run(*args, **kwargs):
        observed.append(state())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(release_git.subprocess, "run", spying_run)
    repo = ReleaseRepo.open_or_init(target)
    monkeypatch.undo()
    observed.append(state())
    assert "half-made" not in observed, observed
    assert observed[-1] == "complete" and repo.branches() == {}
    assert [p.name for p in target.iterdir()] == [".git"]  # no scratch folder left behind


# --- finding 6: no work path is built from a name git refuses -------------------------------------

@pytest.mark.parametrize("branch", [".", "..", "x.lock", "a/b"])
def test_work_paths_and_commits_refuse_branch_names_git_refuses(tmp_path, branch):
    repo = ReleaseRepo.open_or_init(tmp_path / "repo")
    with pytest.raises(ConfigError, match="branch name"):
        repo.commit_branch(branch, files(tmp_path, f="x"), "m")
    assert repo.branches() == {} and not repo.work_dir.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="branch name"):
        repo.branch_file("variants", branch)
