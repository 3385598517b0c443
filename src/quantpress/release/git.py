"""The release repository: one branch per variant, written with git plumbing so a branch only
ever moves from one complete commit to the next.

A variant is committed by hashing its files into the object store, building a tree in a private
index file, writing a commit and only then moving the branch with a compare-and-swap
`update-ref`. A process killed at any point leaves each branch where it was: the objects written
so far are merely unreferenced (and reused by the next run, since object ids are content hashes).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from quantpress.errors import QuantpressError

ZERO = "0" * 40  # update-ref's "must not exist yet"
# What the Hub's own .gitattributes sends to LFS, for the files a GPTQ release holds.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "*.h5", "*.msgpack", "*.onnx")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
IDENTITY = {"GIT_AUTHOR_NAME": "quantpress", "GIT_AUTHOR_EMAIL": "quantpress@localhost",
            "GIT_COMMITTER_NAME": "quantpress", "GIT_COMMITTER_EMAIL": "quantpress@localhost"}


class GitError(QuantpressError):
    """A git command failed; the message carries git's own stderr."""


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

    @classmethod
    def open_or_init(cls, path: str | Path) -> ReleaseRepo:
        repo = cls(Path(path).resolve())  # git runs with -C: every path handed to it must be absolute
        if repo.git_dir.is_dir():
            return repo
        if repo.path.exists() and any(repo.path.iterdir()):
            raise GitError(f"{repo.path} exists and is not a git repository; choose a new or empty folder")
        repo.path.mkdir(parents=True, exist_ok=True)
        repo.git("init", "--quiet", "--initial-branch=main")
        # Safetensors barely compress; zlib at level 1 keeps hashing a 4 GB file from taking minutes.
        repo.git("config", "core.compression", "1")
        # Attributes for `hash-object --path` before any .gitattributes is checked out, so that
        # with git-lfs installed the weights are stored as LFS pointers, as the Hub requires.
        (repo.git_dir / "info").mkdir(exist_ok=True)
        (repo.git_dir / "info" / "attributes").write_text(GITATTRIBUTES)
        if repo._has_lfs():
            repo.git("lfs", "install", "--local")
        return repo

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        result = subprocess.run(["git", "-C", str(self.path), *args], input=stdin, capture_output=True, check=False,
                                env={**os.environ, **IDENTITY, **(env or {})})
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args[:3])} failed in {self.path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def _has_lfs(self) -> bool:
        return subprocess.run(["git", "lfs", "version"], capture_output=True, check=False).returncode == 0

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
        result = subprocess.run(["git", "-C", str(self.path), "cat-file", "blob", f"{commit}:{path}"],
                                capture_output=True, check=False)
        if result.returncode != 0:
            raise GitError(f"cannot read {path} at {commit} in {self.path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def commit_branch(self, branch: str, files: dict[str, Path], message: str, *, start_from: str | None = None) -> str:
        """Point `branch` at a commit whose tree is `start_from`'s tree (if given) plus `files`
        (path in tree -> file on disk). The parent is the branch's current head, so history stays
        linear and pushes fast-forward; an unchanged tree makes no new commit."""
        old = self.branches().get(branch)
        index = self.work_dir / f"index-{branch}.tmp"
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
