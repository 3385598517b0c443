"""The release repository: one branch per variant, written with git plumbing so a branch only
ever moves from one complete commit to the next.

A variant is committed by hashing its files into the object store, building a tree in a private
index file, writing a commit and only then moving the branch with a compare-and-swap
`update-ref`. A process killed at any point leaves each branch where it was: the objects written
so far are merely unreferenced (and reused by the next run, since object ids are content hashes).

A release moves branches and resets its work tree, so it only ever works in a repository it made
itself: one whose config carries quantpress's mark (`quantpress.release = true`, set at init).
Any other git repository, and any folder with files in it, is refused before anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantpress.errors import ConfigError, OutputExistsError, QuantpressError
from quantpress.outputs import check_replaceable, check_writable

ZERO = "0" * 40  # update-ref's "must not exist yet"
# What the Hub's own .gitattributes sends to LFS, for the files a GPTQ release holds.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "*.h5", "*.msgpack", "*.onnx")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
IDENTITY = {"GIT_AUTHOR_NAME": "quantpress", "GIT_AUTHOR_EMAIL": "quantpress@localhost",
            "GIT_COMMITTER_NAME": "quantpress", "GIT_COMMITTER_EMAIL": "quantpress@localhost"}
BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # what text-generation-webui accepts after `repo:`
MARK = "quantpress.release"  # git config key set at init: this repository is a quantpress release
_INIT_PREFIX = ".quantpress-init-"  # a new repository is made in here, then its .git renamed into place


class GitError(QuantpressError):
    """A git command failed; the message carries git's own stderr."""


def check_branch_name(name: str) -> str:
    """`name`, if it can be a release branch: text-generation-webui's `repo:branch` characters, and
    git's own rule for branch names (`git check-ref-format --branch`: no `..`, no leading `.` or
    `-`, no `.lock` suffix, not `HEAD`). Work files in .git/quantpress are named after branches,
    so a name like `.` must be stopped here, before it becomes a path."""
    # The character rule first: it also keeps option-like names and `@{-1}` away from git below.
    if not BRANCH_RE.fullmatch(name):
        raise ConfigError(f"branch name {name!r} may use only letters, digits, '.', '_' and '-'")
    try:
        result = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True, check=False)
    except FileNotFoundError:
        raise ConfigError("git is not installed (or not on PATH); a release needs it") from None
    if result.returncode != 0:
        raise ConfigError(f"branch name {name!r} is not one git accepts (see `git check-ref-format --branch`: "
                          "no '..', no leading '.' or '-', no '.lock' at the end, not 'HEAD')")
    return name


@dataclass(frozen=True)
class ReleaseRepo:
    path: Path

    @property
    def git_dir(self) -> Path:
        return self.path / ".git"

    @property
    def work_dir(self) -> Path:
        """Release state that must never be committed (staged layers, measurements): inside
        .git, where no checkout, `git add` or push can pick it up."""
        return self.git_dir / "quantpress"

    def branch_file(self, folder: str, branch: str, suffix: str = "") -> Path:
        """`.git/quantpress/<folder>/<branch><suffix>`: the one way a work path is named after a
        branch, so every such path comes from a name git accepts."""
        return self.work_dir / folder / (check_branch_name(branch) + suffix)

    @classmethod
    def open_or_init(cls, path: str | Path) -> ReleaseRepo:
        """The release repository at `path`: one quantpress made earlier, or a new one in a new or
        empty folder. Anything else is refused (OutputExistsError) before anything is written."""
        repo = cls(Path(path).resolve())  # git runs with -C: every path handed to it must be absolute
        check_replaceable(repo.path, overwrite=True, ours=_not_a_release, what="release repository")
        check_writable(repo.git_dir)
        if not repo.git_dir.exists():
            repo._init_atomically()
        return repo

    @classmethod
    def open(cls, path: str | Path) -> ReleaseRepo:
        """An existing release repository (for publish): refused unless quantpress made it."""
        repo = cls(Path(path).resolve())
        if not repo.git_dir.is_dir():
            raise GitError(f"{repo.path} is not a git repository")
        reason = _not_a_release(repo.path)
        if reason is not None:
            raise GitError(f"{repo.path} is not a release quantpress wrote ({reason})")
        return repo

    def _init_atomically(self) -> None:
        """Make the repository in a scratch folder inside `path`, then rename its .git into place:
        whoever looks (a second run, a test polling the branches) sees no .git or a complete one,
        marked as ours, never a half-initialised one."""
        self.path.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=_INIT_PREFIX, dir=self.path))
        try:
            fresh = ReleaseRepo(scratch)
            fresh.git("init", "--quiet", "--initial-branch=main")
            # Safetensors barely compress; zlib at level 1 keeps hashing a 4 GB file from taking minutes.
            fresh.git("config", "core.compression", "1")
            # Attributes for `hash-object --path` before any .gitattributes is checked out, so that
            # with git-lfs installed the weights are stored as LFS pointers, as the Hub requires.
            (fresh.git_dir / "info").mkdir(exist_ok=True)
            (fresh.git_dir / "info" / "attributes").write_text(GITATTRIBUTES)
            if _has_lfs():
                fresh.git("lfs", "install", "--local")
            fresh.git("config", "--bool", MARK, "true")
            try:
                os.rename(fresh.git_dir, self.git_dir)
            except OSError:  # another run made .git first: use it only if it is a release too
                if _not_a_release(self.path) is not None:
                    raise OutputExistsError(f"{self.path} got a git repository that is not a release while "
                                            "this one was being made; refusing to write into it") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _command(self, *args: str) -> list[str]:
        # --git-dir pins the repository: without it a missing .git would make git find (and this
        # code commit to, and reset) a repository in a parent folder.
        return ["git", "-C", str(self.path), f"--git-dir={self.git_dir}", f"--work-tree={self.path}", *args]

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        result = subprocess.run(self._command(*args), input=stdin, capture_output=True, check=False,
                                env={**os.environ, **IDENTITY, **(env or {})})
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args[:3])} failed in {self.path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def branches(self) -> dict[str, str]:
        out = self.git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/")
        return dict(line.split(" ", 1) for line in out.splitlines())

    def message(self, commit: str) -> str:
        return self.git("log", "-1", "--format=%B", commit)

    def tree_of(self, commit: str) -> str:
        return self.git("rev-parse", f"{commit}^{{tree}}").strip()

    def files(self, commit: str) -> dict[str, int]:
        """path -> size of every file in a commit's tree."""
        out = self.git("ls-tree", "-r", "-l", "-z", commit)
        entries = (line.split("\t", 1) for line in out.split("\0") if line)
        return {path: int(meta.split()[3]) for meta, path in entries}

    def read(self, commit: str, path: str) -> bytes:
        """A file's bytes as committed (binary: not through `git()`, which decodes text)."""
        result = subprocess.run(self._command("cat-file", "blob", f"{commit}:{path}"), capture_output=True, check=False)
        if result.returncode != 0:
            raise GitError(f"cannot read {path} at {commit} in {self.path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def commit_branch(self, branch: str, files: dict[str, Path], message: str, *, start_from: str | None = None) -> str:
        """Point `branch` at a commit whose tree is `start_from`'s tree (if given) plus `files`
        (path in tree -> file on disk). The parent is the branch's current head, so history stays
        linear and pushes fast-forward; an unchanged tree makes no new commit."""
        index = self.branch_file("index", branch, ".tmp")  # checks the name before anything is written
        old = self.branches().get(branch)
        index.parent.mkdir(parents=True, exist_ok=True)
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            self.git("read-tree", *([start_from] if start_from else ["--empty"]), env=env)
            for name, file in sorted(files.items()):
                blob = self.git("hash-object", "-w", f"--path={name}", "--", str(file.resolve())).strip()
                self.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", env=env)
            tree = self.git("write-tree", env=env).strip()
        finally:
            index.unlink(missing_ok=True)
        if old is not None and self.tree_of(old) == tree:
            return old
        commit = self.git("commit-tree", tree, *(["-p", old] if old else []), "-F", "-", stdin=message.encode()).strip()
        self.git("update-ref", "-m", f"quantpress release: {branch}", f"refs/heads/{branch}", commit, old or ZERO)
        return commit

    def check_out_main(self) -> None:
        """Make the working tree show `main`, as a clone would."""
        self.git("symbolic-ref", "HEAD", "refs/heads/main")
        self.git("reset", "--hard", "--quiet")

    def push(self, remote: str, *, force: bool = False) -> str:
        """Push every branch to any git remote (a URL or a path)."""
        refspec = ("+" if force else "") + "refs/heads/*:refs/heads/*"
        return self.git("push", "--porcelain", remote, refspec, env={"GIT_TERMINAL_PROMPT": "0"})


def _not_a_release(folder: Path) -> str | None:
    """None when a release may be written in `folder`: it is empty, or its .git carries quantpress's
    mark. Else why not (outputs.check_replaceable's `ours`)."""
    git_dir = folder / ".git"
    if not (git_dir.exists() or git_dir.is_symlink()):
        # Scratch folders of an init killed before its rename are ours and hold no user data.
        entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(_INIT_PREFIX))
        return f"it is not empty: it holds {', '.join(entries[:3])}" if entries else None
    mark = subprocess.run(["git", "config", "--file", str(git_dir / "config"), "--bool", "--get", MARK],
                          capture_output=True, text=True, check=False)
    if git_dir.is_dir() and mark.stdout.strip() == "true":
        return None
    return (f"it is a git repository without quantpress's mark `{MARK}`; if it is a release written by an "
            f"older quantpress, mark it with `git -C {folder} config {MARK} true`")


def _has_lfs() -> bool:
    return subprocess.run(["git", "lfs", "version"], capture_output=True, check=False).returncode == 0
