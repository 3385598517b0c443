"""Downloading one variant (branch) of a release into a folder: `quantpress download SOURCE[:branch]`.

A source is either a git repository (a local folder, `file://`, `https://`, `ssh://`, scp-like
`user@host:path`) or a Hugging Face Hub repo id (`org/model`, or its `https://huggingface.co/...`
URL), with the branch written as text-generation-webui does: `org/model:gptq-4bit-128g-actorder_True`.

Git sources are fetched (depth 1) into a bare cache repository kept inside the target folder,
`<local_dir>/.cache/quantpress/git`, as huggingface_hub keeps its metadata in
`<local_dir>/.cache/huggingface/`. Each file of the branch's tree is then written to
`<file>.incomplete`, checked against its git object id (the source's own checksum), fsynced and
renamed into place, so a file under its final name is always whole. A re-run skips files whose
content already matches and rewrites the rest; the cache repository keeps what was fetched.
`<local_dir>/.cache/quantpress/download.json` records the source, commit and every file's size,
git blob id and sha256. It is also the folder's mark: a download writes only into a new or empty
folder, or into one whose manifest names the same source (another branch of it, or a re-run), so
it never writes over files it did not put there.

Hub sources go through `huggingface_hub.snapshot_download` (which resumes byte-wise itself), and
every file is then checked against the Hub's listing (LFS sha256 or git blob id).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from quantpress.errors import ConfigError, DownloadError, OutputExistsError
from quantpress.formats.hf_folder import atomic_write_json, atomic_write_text
from quantpress.outputs import check_disjoint, check_writable
from quantpress.release.git import BRANCH_RE

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""`progress(file_name, done_bytes, total_bytes)`: (name, 0, total) before a file is fetched, then
after every chunk written; a file already present and verified reports (name, total, total) once."""

METADATA_DIR = Path(".cache") / "quantpress"
MANIFEST_NAME = "download.json"
_CHUNK = 1 << 20
_LFS_POINTER_MAX = 1024  # the git-lfs spec: pointer files are smaller than this
_LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"

# Flags for every git call, so the user's global config cannot change what happens in the cache
# repository: no hooks (a global core.hooksPath would run them on fetch), no background gc
# repacking objects while we read them, no default-branch hint on init.
_GIT_FLAGS = ("-c", "core.hooksPath=/dev/null", "-c", "gc.auto=0", "-c", "maintenance.auto=false",
              "-c", "init.defaultBranch=main")

# `https://host:8080` and `git@host` before the last ':' mean that colon is a port or the scp
# separator, not the start of a branch name.
_URL_AUTHORITY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*$")
_SCP_HOST_RE = re.compile(r"^[^/:@\s-][^/:@\s]*@[^/:@\s]+$")
_SCP_RE = re.compile(r"^[^/:@\s-][^/:@\s]*@[^/:@\s]+:.+$")  # user@host:path (git's scp-like syntax)
_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/"
                         r"(?P<repo>[^/:]+(?:/[^/:]+)?)(?:/tree/(?P<branch>[^/]+))?/?$")
# huggingface_hub.utils.validate_repo_id: `name` or `namespace/name`, ASCII letters, digits, `-_.`,
# not starting or ending with `-`/`.`, no `--` or `..`, at most 96 characters each, no `.git` suffix.
_HUB_PART_RE = re.compile(r"^(?![.-])[A-Za-z0-9_.-]{1,96}(?<![.-])$")


@dataclass(frozen=True)
class Source:
    kind: Literal["git", "hub"]
    location: str  # git: an absolute path or URL; hub: the repo id
    branch: str = "main"

    def __str__(self) -> str:
        return f"{self.location}:{self.branch}"


@dataclass
class DownloadReport:
    source: Source
    commit: str  # the commit (git) or Hub revision sha the files come from
    local_dir: Path
    written: list[str] = field(default_factory=list)  # fetched by this run
    verified: list[str] = field(default_factory=list)  # already present with the right content
    skipped: list[str] = field(default_factory=list)  # symlinks and submodules: not written
    left_over: list[str] = field(default_factory=list)  # an earlier download's files this revision lacks; kept
    bytes_written: int = 0
    total_bytes: int = 0


# ----------------------------------------------------------------------------------------------
# Parsing SOURCE[:branch]


def parse_source(spec: str, branch: str | None = None) -> Source:
    """Read `SOURCE[:branch]` as text-generation-webui does; `branch` is the `--branch` option.

    The split is on the last ':' and only when what follows is a valid branch name and the colon
    is not a URL port or the scp `host:` separator. An existing folder named with a ':' is taken
    whole.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("download source is empty: give a git location or a Hub repo id like org/model")
    location, colon_branch = _split_branch(spec)
    kind, location, url_branch = _classify(location, spec)
    chosen = _agree_on_branch(spec, branch, colon_branch, url_branch)
    return Source(kind, location, chosen)


def _split_branch(spec: str) -> tuple[str, str | None]:
    if os.path.isdir(spec):
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or not BRANCH_RE.fullmatch(tail):
        return spec, None
    if _URL_AUTHORITY_RE.match(head) or _SCP_HOST_RE.match(head):
        return spec, None
    return head, tail


def _classify(location: str, spec: str) -> tuple[Literal["git", "hub"], str, str | None]:
    """(kind, normalized location, branch named in a Hub `/tree/<branch>` URL)."""
    if os.path.isdir(location):
        # Absolute, because git runs with `-C <cache>` and would read a relative path from there.
        return "git", str(Path(location).resolve()), None
    hub_url = _HUB_URL_RE.match(location)
    if hub_url:
        repo = hub_url["repo"].removesuffix(".git")
        if not _is_hub_repo_id(repo):
            raise ConfigError(f"{spec!r}: {repo!r} is not a valid Hugging Face repo id")
        return "hub", repo, hub_url["branch"]
    if "://" in location or _SCP_RE.match(location) or location.endswith(".git"):
        return "git", location, None
    if _is_hub_repo_id(location):
        return "hub", location, None
    raise ConfigError(
        f"{spec!r} is neither a git location (an existing folder, a URL, user@host:path or a path "
        "ending in .git) nor a Hugging Face repo id (org/model); a branch after ':' may use only "
        "letters, digits, '.', '_' and '-'")


def _is_hub_repo_id(repo: str) -> bool:
    parts = repo.split("/")
    return (len(parts) <= 2 and all(_HUB_PART_RE.match(p) for p in parts)
            and "--" not in repo and ".." not in repo and not repo.endswith(".git"))


def _agree_on_branch(spec: str, *candidates: str | None) -> str:
    named = {b for b in candidates if b is not None}
    if len(named) > 1:
        raise ConfigError(f"{spec!r}: conflicting branches {', '.join(sorted(named))}; name the branch once")
    chosen = named.pop() if named else "main"
    if not BRANCH_RE.fullmatch(chosen):
        raise ConfigError(f"branch {chosen!r} is invalid: use only letters, digits, '.', '_' and '-'")
    return chosen


# ----------------------------------------------------------------------------------------------
# Downloading


def download(source: Source, local_dir: Path, *, progress: Progress | None = None) -> DownloadReport:
    """Make `local_dir` hold the files of `source.branch`, each verified against the source's checksums.

    Files already present with the right content are kept as they are; files the folder holds
    that the branch lacks are never deleted (they are listed in `report.left_over` when an earlier
    download wrote them). A non-empty `local_dir` that is not a download of the same source is
    refused (OutputExistsError) before anything is fetched.
    """
    local_dir = Path(local_dir).resolve()
    if source.kind == "git" and os.path.isdir(source.location):
        # git runs inside the cache (a relative path would break), and the claim compares locations
        source = replace(source, location=str(Path(source.location).resolve()))
    remote = _local_remote(source.location) if source.kind == "git" else None
    check_disjoint(local_dir, {"source repository": remote})
    check_writable(local_dir / METADATA_DIR.parts[0])  # .cache/ is the first thing written in it
    _claim(local_dir, source)
    if source.kind == "git":
        return _download_git(source, local_dir, progress)
    return _download_hub(source, local_dir, progress)


def _claim(local_dir: Path, source: Source) -> None:
    """Make sure the files about to be written cannot replace anything but an earlier download of
    the same source (any branch of it), and mark the folder as such before the first file lands:
    a killed download is then still recognised as ours. The mark is the manifest; until the
    download finishes it names the source and no commit or files."""
    manifest = local_dir / METADATA_DIR / MANIFEST_NAME
    recorded = _recorded_source(manifest)
    if recorded is None:
        if _holds_files(local_dir):
            raise OutputExistsError(
                f"{local_dir} already holds files and is not a quantpress download (no "
                f"{METADATA_DIR / MANIFEST_NAME}); refusing to write over them: choose a new or empty folder")
        _write_manifest(manifest, source, None, {})
    elif recorded != (source.kind, source.location):
        raise OutputExistsError(f"{local_dir} holds a download of {recorded[1]}, not of {source.location}; refusing "
                                "to write over it: choose another folder")


def _holds_files(folder: Path) -> bool:
    """Anything but (empty) folders in `folder`; stops at the first file, so a big tree is cheap."""
    return folder.exists() and any(p.is_symlink() or not p.is_dir() for p in folder.rglob("*"))


@dataclass(frozen=True)
class _Digest:
    size: int
    sha1: str  # the git blob id of the content: sha1(b"blob <size>\0" + content)
    sha256: str


@dataclass(frozen=True)
class _Expected:
    """What a file must hash to: its git blob id, or for an LFS object its sha256."""

    size: int
    sha1: str | None = None
    sha256: str | None = None

    def matches(self, d: _Digest) -> bool:
        return (d.size == self.size and (self.sha1 is None or d.sha1 == self.sha1)
                and (self.sha256 is None or d.sha256 == self.sha256))


class _Hasher:
    """Git blob id and sha256 in one pass; the git header needs the size before the content."""

    def __init__(self, size: int) -> None:
        self.sha1 = hashlib.sha1(b"blob %d\0" % size)
        self.sha256 = hashlib.sha256()
        self.done = 0

    def update(self, chunk: bytes) -> None:
        self.sha1.update(chunk)
        self.sha256.update(chunk)
        self.done += len(chunk)

    def digest(self) -> _Digest:
        return _Digest(self.done, self.sha1.hexdigest(), self.sha256.hexdigest())


def _hash_file(path: Path) -> _Digest:
    with open(path, "rb") as f:
        hasher = _Hasher(os.fstat(f.fileno()).st_size)
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.digest()


def _present_digest(dest: Path, want: _Expected) -> _Digest | None:
    """The file's digest when it is already there with the right content."""
    if not dest.is_file() or dest.stat().st_size != want.size:
        return None
    digest = _hash_file(dest)
    return digest if want.matches(digest) else None


def _incomplete(dest: Path) -> Path:
    return dest.with_name(dest.name + ".incomplete")


def _install(dest: Path, name: str, opener: Callable[[], AbstractContextManager[BinaryIO]],
             want: _Expected, progress: Progress | None, *, executable: bool = False) -> _Digest:
    """Stream into `<dest>.incomplete`, verify, fsync, rename over `dest`. On any failure the
    `.incomplete` file is removed, so the folder never holds a partial file under its final name
    and no debris. (A process killed here leaves `.incomplete`; the next run rewrites it: git has
    no byte-range fetch to resume from.)"""
    tmp = _incomplete(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        hasher = _Hasher(want.size)
        with open(tmp, "wb") as f:
            if progress:
                progress(name, 0, want.size)
            with opener() as stream:  # leaving this checks the reader's exit status (git cat-file)
                while chunk := stream.read(_CHUNK):
                    f.write(chunk)
                    hasher.update(chunk)
                    if progress:
                        progress(name, hasher.done, want.size)
            f.flush()
            os.fsync(f.fileno())
        digest = hasher.digest()
        if not want.matches(digest):
            raise DownloadError(f"{name}: the fetched content does not match the source's checksum "
                                f"(expected {want}, got {digest}); the source repository may be corrupt")
        if executable:
            mode = tmp.stat().st_mode
            tmp.chmod(mode | (mode & 0o444) >> 2)  # x wherever r, as git checks out 100755
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"could not write {dest}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


# ----------------------------------------------------------------------------------------------
# Git sources


@dataclass(frozen=True)
class _TreeEntry:
    path: str
    mode: str  # 100644, 100755, 120000 (symlink), 160000 (submodule)
    oid: str
    size: int  # 0 for submodules


@dataclass(frozen=True)
class _LfsPointer:
    oid: str  # sha256 hex of the object
    size: int


def _git(repo: Path, *args: str, network: bool = False) -> subprocess.CompletedProcess[bytes]:
    # Never prompt for credentials on a terminal: a missing login should fail, not hang.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"} if network else None
    try:
        return subprocess.run(["git", "-C", str(repo), *_GIT_FLAGS, *args],
                              check=False, capture_output=True, env=env)
    except FileNotFoundError:
        raise DownloadError("git is not installed (or not on PATH); it is needed for git sources") from None


def _git_ok(repo: Path, *args: str, network: bool = False) -> bytes:
    result = _git(repo, *args, network=network)
    if result.returncode:
        raise DownloadError(f"git {args[0]} failed: {_stderr(result)}")
    return result.stdout


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "replace").strip()


def _download_git(source: Source, local_dir: Path, progress: Progress | None) -> DownloadReport:
    meta = local_dir / METADATA_DIR
    cache = meta / "git"
    cache.mkdir(parents=True, exist_ok=True)
    # A `.gitignore` of `*`, as huggingface_hub writes, keeps the metadata out of a repository
    # the user may keep `local_dir` in.
    if not (meta / ".gitignore").exists():
        atomic_write_text(meta / ".gitignore", "*\n")
    _git_ok(cache, "init", "--bare", "--quiet", "--template=")  # idempotent; repairs a half-made one
    commit = _fetch_branch(cache, source)
    previous = _read_manifest(meta / MANIFEST_NAME)
    report = DownloadReport(source, commit, local_dir)
    files: dict[str, dict] = {}
    for entry in _tree(cache, commit):
        if entry.mode in ("120000", "160000"):
            log.warning("%s: %s is a %s; not written", source, entry.path,
                        "symlink" if entry.mode == "120000" else "submodule")
            report.skipped.append(entry.path)
            continue
        files[entry.path] = _sync_file(cache, source, local_dir, entry, progress, report)
    report.left_over = sorted(p for p in previous if p not in files and (local_dir / p).is_file())
    _write_manifest(meta / MANIFEST_NAME, source, commit, files)
    return report


def _fetch_branch(cache: Path, source: Source) -> str:
    """Fetch the branch's tip (depth 1) into `refs/quantpress/<branch>` and return its commit."""
    ref = f"refs/quantpress/{source.branch}"
    result = _git(cache, "fetch", "--quiet", "--no-tags", "--depth", "1", "--",
                  source.location, f"+refs/heads/{source.branch}:{ref}", network=True)
    if result.returncode:
        branches = _remote_branches(cache, source.location)
        if branches is not None and source.branch not in branches:
            listed = ", ".join(branches) if branches else "none"
            raise DownloadError(f"branch {source.branch!r} not found in {source.location}; its branches: {listed}")
        raise DownloadError(f"fetching branch {source.branch!r} from {source.location} failed: {_stderr(result)}")
    return _git_ok(cache, "rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()


def _remote_branches(cache: Path, location: str) -> list[str] | None:
    """The remote's branch names, or None when it cannot be listed (so the fetch error is the news)."""
    result = _git(cache, "ls-remote", "--heads", "--", location, network=True)
    if result.returncode:
        return None
    refs = [line.split("\t", 1)[1] for line in result.stdout.decode().splitlines() if "\t" in line]
    return sorted(r.removeprefix("refs/heads/") for r in refs)


def _tree(cache: Path, commit: str) -> list[_TreeEntry]:
    """Every file of the commit (`ls-tree -r -l -z`: "<mode> <type> <oid> <size>\\t<path>\\0")."""
    entries = []
    for record in _git_ok(cache, "ls-tree", "-r", "-l", "-z", "--full-tree", commit).split(b"\0"):
        if not record:
            continue
        meta, _, path = record.partition(b"\t")
        mode, _kind, oid, size = meta.decode().split()
        entries.append(_TreeEntry(os.fsdecode(path), mode, oid, int(size) if size.isdigit() else 0))
    return entries


def _target(local_dir: Path, path: str) -> Path:
    """Where a tree path goes, refusing paths that would land outside the folder or in our metadata
    (git itself never produces them, but a crafted repository could)."""
    parts = PurePosixPath(path).parts
    if (not parts or path.startswith("/") or any(p in (".", "..") or p.lower() == ".git" for p in parts)
            or parts[:2] == METADATA_DIR.parts):
        raise DownloadError(f"refusing to write {path!r} from the source: it points outside the "
                            "target folder or into its metadata")
    return local_dir.joinpath(*parts)


def _sync_file(cache: Path, source: Source, local_dir: Path, entry: _TreeEntry,
               progress: Progress | None, report: DownloadReport) -> dict:
    """Make one file present and verified; its manifest entry."""
    dest = _target(local_dir, entry.path)
    # Small blobs are read whole: they may be LFS pointers, and are then written from memory.
    small = _git_ok(cache, "cat-file", "blob", entry.oid) if entry.size < _LFS_POINTER_MAX else None
    pointer = _parse_lfs_pointer(small, entry.path) if small is not None else None
    if pointer:
        want = _Expected(pointer.size, sha256=pointer.oid)
    else:
        want = _Expected(entry.size, sha1=entry.oid)
    digest = _present_digest(dest, want)
    if digest is not None:
        report.verified.append(entry.path)
        if progress:
            progress(entry.path, want.size, want.size)
    else:
        if pointer:
            opener: Callable[[], AbstractContextManager[BinaryIO]] = partial(
                open, _lfs_object(source, pointer, entry.path), "rb")
        elif small is not None:
            opener = partial(nullcontext, io.BytesIO(small))
        else:
            opener = partial(_open_blob, cache, entry.oid)
        digest = _install(dest, entry.path, opener, want, progress, executable=entry.mode == "100755")
        report.written.append(entry.path)
        report.bytes_written += digest.size
    _incomplete(dest).unlink(missing_ok=True)  # a killed earlier run's leftover for this file
    report.total_bytes += digest.size
    return {"size": digest.size, "sha1": digest.sha1, "sha256": digest.sha256, "lfs": pointer is not None}


@contextmanager
def _open_blob(cache: Path, oid: str) -> Iterator[BinaryIO]:
    """The blob's content as a stream; leaving the block normally checks that git succeeded."""
    cmd = ["git", "-C", str(cache), *_GIT_FLAGS, "cat-file", "blob", oid]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        yield proc.stdout
        error = proc.stderr.read()
        if proc.wait():
            raise DownloadError(f"git cat-file blob {oid} failed: {error.decode('utf-8', 'replace').strip()}")


def _parse_lfs_pointer(data: bytes, path: str) -> _LfsPointer | None:
    if not data.startswith(_LFS_PREFIX):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode("utf-8", "replace").splitlines() if " " in line)
    algo, _, oid = fields.get("oid", "").partition(":")
    size = fields.get("size", "")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", oid) or not size.isdigit():
        raise DownloadError(f"{path} is a malformed Git LFS pointer: {data[:200]!r}")
    return _LfsPointer(oid, int(size))


def _local_remote(location: str) -> Path | None:
    """The remote's folder when it is on this machine (a path or a file:// URL)."""
    if location.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    else:
        path = Path(location)
    return path if path.is_absolute() and path.is_dir() else None


def _lfs_object(source: Source, pointer: _LfsPointer, path: str) -> Path:
    """The LFS object in a local remote's store (bare: `lfs/objects`, with a work tree: `.git/lfs/objects`)."""
    remote = _local_remote(source.location)
    if remote is None:
        raise DownloadError(
            f"{path} is stored with Git LFS, and quantpress cannot fetch LFS content from "
            f"{source.location} (it does not speak the git-lfs protocol). For a Hugging Face repo "
            "use its repo id (org/model) as the source; otherwise clone it with git-lfs installed "
            "and download from the local clone")
    relative = Path("lfs", "objects", pointer.oid[:2], pointer.oid[2:4], pointer.oid)
    for candidate in (remote / relative, remote / ".git" / relative):
        if candidate.is_file():
            return candidate
    raise DownloadError(f"{path} is a Git LFS pointer, and its object {pointer.oid} is not in "
                        f"{remote}'s LFS store; run `git lfs fetch` there first")


# ----------------------------------------------------------------------------------------------
# Hub sources


def _download_hub(source: Source, local_dir: Path, progress: Progress | None) -> DownloadReport:
    # Imported here so that git downloads and `parse_source` do not pay for huggingface_hub.
    # Tokens (HF_TOKEN, `hf auth login`) are found by huggingface_hub itself.
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    repo = source.location
    try:
        # Pin the branch to one commit so the listing and the files cannot come from two pushes.
        commit = api.model_info(repo, revision=source.branch).sha
        tree = [e for e in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(e, RepoFile)]
        before = {e.path: _stat_key(local_dir / e.path) for e in tree}
        snapshot_download(repo, revision=commit, local_dir=local_dir)
    except RevisionNotFoundError:
        branches = sorted(b.name for b in api.list_repo_refs(repo).branches)
        raise DownloadError(f"branch {source.branch!r} not found in {repo}; its branches: "
                            f"{', '.join(branches) or 'none'}") from None
    except RepositoryNotFoundError as e:
        raise DownloadError(f"{repo} not found on the Hub, or it is private or gated: log in with "
                            f"`hf auth login` or set HF_TOKEN ({e})") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"downloading {source} from the Hub failed: {e}") from None

    report = DownloadReport(source, str(commit), local_dir)
    files = {}
    for entry in sorted(tree, key=lambda e: e.path):
        dest = _target(local_dir, entry.path)
        if entry.lfs is not None:
            want = _Expected(entry.lfs.size, sha256=entry.lfs.sha256)
        else:
            want = _Expected(entry.size, sha1=entry.blob_id)
        if not dest.is_file():
            raise DownloadError(f"{entry.path} is missing after the Hub download")
        digest = _hash_file(dest)
        if not want.matches(digest):
            raise DownloadError(f"{entry.path} does not match the Hub's checksum (expected {want}, got "
                                f"{digest}); delete it and download again")
        changed = before[entry.path] != _stat_key(dest)
        (report.written if changed else report.verified).append(entry.path)
        report.bytes_written += digest.size if changed else 0
        report.total_bytes += digest.size
        files[entry.path] = {"size": digest.size, "sha1": digest.sha1, "sha256": digest.sha256,
                             "lfs": entry.lfs is not None}
        if progress:
            progress(entry.path, digest.size, digest.size)
    meta = local_dir / METADATA_DIR
    previous = _read_manifest(meta / MANIFEST_NAME)
    report.left_over = sorted(p for p in previous if p not in files and (local_dir / p).is_file())
    _write_manifest(meta / MANIFEST_NAME, source, report.commit, files)
    return report


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------------------------
# The manifest


def _read_manifest(path: Path) -> dict[str, dict]:
    """The files an earlier download recorded; empty when there is none (or it is unreadable:
    it only feeds `left_over`)."""
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _recorded_source(path: Path) -> tuple[str, str] | None:
    """(kind, location) of the source an earlier download in this folder came from."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["source"]
        return recorded["kind"], recorded["location"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None


def _write_manifest(path: Path, source: Source, commit: str | None, files: dict[str, dict]) -> None:
    manifest = {
        "source": {"kind": source.kind, "location": source.location, "branch": source.branch},
        "branch": source.branch,
        "commit": commit,
        # sha1: the git blob id of the file as written; sha256: of its bytes (an LFS file's oid)
        "files": files,
    }
    atomic_write_json(path, manifest)
