"""`quantpress download`: source parsing, and downloads from real git repositories in temp dirs.

The source repository has two branches laid out as a release (`main` plus a GPTQ variant branch),
and a bare clone of it serves as a `file://` remote. The Hub path is checked with huggingface_hub's
own `RepoFile` objects and a fake transport (there is no network here).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantpress.errors import ConfigError, DownloadError, OutputExistsError
from quantpress.release import download as dl
from quantpress.release.download import Source, download, parse_source

VARIANT = "gptq-4bit-128g-actorder_True"
MODEL_SIZE = 1_500_000  # > one 1 MiB chunk, so a download can be killed inside it

BRANCHES: dict[str, dict[str, bytes]] = {
    "main": {
        "README.md": b"# Tiny GPTQ\n\nThe recommended variant.\n",
        "config.json": b'{"model_type": "llama", "bits": 4, "group_size": -1}\n',
        "model.safetensors": random.Random(0).randbytes(MODEL_SIZE),
        "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
        "scripts/convert.sh": b"#!/bin/sh\necho convert\n",
    },
    VARIANT: {
        "README.md": b"# Tiny GPTQ\n\n4-bit, group size 128, act-order.\n",
        "config.json": b'{"model_type": "llama", "bits": 4, "group_size": 128}\n',
        "model.safetensors": random.Random(1).randbytes(MODEL_SIZE - 1000),
        "quantize_config.json": b'{"bits": 4, "group_size": 128, "desc_act": true}\n',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
    },
}


def git(cwd: Path, *args: str) -> str:
    flags = ["-c", "user.name=quantpress-test", "-c", "user.email=test@quantpress.invalid",
             "-c", "init.defaultBranch=main", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgSign=false"]
    result = subprocess.run(["git", "-C", str(cwd), *flags, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"git {args}: {result.stderr}"
    return result.stdout


def commit_files(repo: Path, branch: str, files: dict[str, bytes], *, executable: tuple[str, ...] = ()) -> None:
    """Make `branch` hold exactly `files`."""
    git(repo, "checkout", "-q", "-B", branch)
    git(repo, "rm", "-rq", "--ignore-unmatch", ".")
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o755 if name in executable else 0o644)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"{branch}: {len(files)} files")


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, str]:
    """{"path": the work-tree repo, "url": file:// URL of its bare clone}."""
    root = tmp_path_factory.mktemp("release-repo")
    work = root / "work"
    work.mkdir()
    git(work, "init", "-q")
    commit_files(work, "main", BRANCHES["main"], executable=("scripts/convert.sh",))
    commit_files(work, VARIANT, BRANCHES[VARIANT])
    git(root, "clone", "-q", "--bare", str(work), str(root / "bare.git"))
    return {"path": str(work), "url": (root / "bare.git").as_uri()}


def user_files(folder: Path) -> dict[str, bytes]:
    """Every file in the folder outside the download metadata, by relative POSIX path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != ".cache"}


def manifest(folder: Path) -> dict:
    return json.loads((folder / ".cache/quantpress/download.json").read_text())


def incomplete_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.incomplete"))


# ----------------------------------------------------------------------------------------------
# parse_source


@pytest.mark.parametrize("spec, kind, location, branch", [
    ("TheBloke/Mistral-7B-GPTQ:gptq-4bit-32g-actorder_True", "hub", "TheBloke/Mistral-7B-GPTQ",
     "gptq-4bit-32g-actorder_True"),
    ("TheBloke/Mistral-7B-GPTQ", "hub", "TheBloke/Mistral-7B-GPTQ", "main"),
    ("gpt2", "hub", "gpt2", "main"),
    ("gpt2:v1.0", "hub", "gpt2", "v1.0"),
    ("https://huggingface.co/org/model", "hub", "org/model", "main"),
    ("https://huggingface.co/org/model/", "hub", "org/model", "main"),
    ("https://huggingface.co/org/model:dev", "hub", "org/model", "dev"),
    ("https://huggingface.co/org/model/tree/dev", "hub", "org/model", "dev"),
    ("git@github.com:org/repo.git", "git", "git@github.com:org/repo.git", "main"),
    ("git@github.com:org/repo.git:dev", "git", "git@github.com:org/repo.git", "dev"),
    ("git@host:repo.git", "git", "git@host:repo.git", "main"),  # the colon is scp's, not a branch
    ("git@host:repo", "git", "git@host:repo", "main"),
    ("https://host:8080/x", "git", "https://host:8080/x", "main"),
    ("https://host:8080", "git", "https://host:8080", "main"),  # a port, not a branch
    ("https://host:8080/org/repo.git:dev", "git", "https://host:8080/org/repo.git", "dev"),
    ("ssh://git@host:22/repo.git", "git", "ssh://git@host:22/repo.git", "main"),
    ("file:///srv/release.git:dev", "git", "file:///srv/release.git", "dev"),
    ("../elsewhere/release.git", "git", "../elsewhere/release.git", "main"),
])
def test_parse_source(spec, kind, location, branch):
    assert parse_source(spec) == Source(kind, location, branch)


def test_parse_source_explicit_branch():
    assert parse_source("org/model", "dev") == Source("hub", "org/model", "dev")
    assert parse_source("org/model:dev", "dev") == Source("hub", "org/model", "dev")
    with pytest.raises(ConfigError, match="conflicting branches"):
        parse_source("org/model:dev", "main")
    with pytest.raises(ConfigError, match="conflicting branches"):
        parse_source("https://huggingface.co/org/model/tree/a", "b")


@pytest.mark.parametrize("spec, branch", [
    ("org/model:bad branch", None),
    ("org/model:", None),
    ("org/model", "bad/branch"),
    ("org/model", "a b"),
    ("org/model", "dev\n"),
    ("org/model/extra", None),
    ("foo--bar", None),
    (".hidden", None),
    ("", None),
    ("   ", None),
])
def test_parse_source_rejects(spec, branch):
    with pytest.raises(ConfigError):
        parse_source(spec, branch)


def test_parse_source_local_paths(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert parse_source(f"{repo}:dev") == Source("git", str(repo.resolve()), "dev")
    assert parse_source(str(repo)) == Source("git", str(repo.resolve()), "main")
    monkeypatch.chdir(tmp_path)
    # Relative paths become absolute: git runs inside the cache repository.
    assert parse_source("repo:dev") == Source("git", str(repo.resolve()), "dev")
    # An existing folder whose name has a ':' is the location, whole.
    (tmp_path / "odd:name").mkdir()
    assert parse_source(str(tmp_path / "odd:name")) == Source("git", str((tmp_path / "odd:name").resolve()), "main")


# ----------------------------------------------------------------------------------------------
# Git downloads


@pytest.mark.parametrize("remote", ["path", "url"])
@pytest.mark.parametrize("branch", ["main", VARIANT])
def test_download_branch(repos, tmp_path, remote, branch):
    """Each branch arrives exactly: its files, byte for byte, nothing else, and the manifest agrees."""
    out = tmp_path / "out"
    calls: list[tuple[str, int, int]] = []
    report = download(parse_source(f"{repos[remote]}:{branch}"), out, progress=lambda *a: calls.append(a))

    expected = BRANCHES[branch]
    assert user_files(out) == expected
    assert sorted(report.written) == sorted(expected) and report.verified == []
    assert report.bytes_written == report.total_bytes == sum(map(len, expected.values()))
    assert report.commit == git(Path(repos["path"]), "rev-parse", branch).strip()
    assert incomplete_files(out) == []
    if branch == "main":
        assert os.access(out / "scripts/convert.sh", os.X_OK)  # mode 100755 kept
        assert not os.access(out / "README.md", os.X_OK)
    # Progress: every file starts at 0 and ends at its size.
    for name, content in expected.items():
        mine = [(done, total) for n, done, total in calls if n == name]
        assert mine[0] == (0, len(content)) and mine[-1] == (len(content), len(content))

    recorded = manifest(out)
    assert recorded["branch"] == branch and recorded["commit"] == report.commit
    assert recorded["source"]["kind"] == "git"
    assert set(recorded["files"]) == set(expected)
    for name, content in expected.items():
        entry = recorded["files"][name]
        assert entry["sha256"] == hashlib.sha256(content).hexdigest() == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry["sha1"] == git(Path(repos["path"]), "rev-parse", f"{branch}:{name}").strip()
        assert entry["size"] == len(content) and entry["lfs"] is False


def test_second_branch_into_same_folder_keeps_user_files(repos, tmp_path):
    """Switching branches rewrites what differs, keeps what matches, and deletes nothing."""
    out = tmp_path / "out"
    download(parse_source(f"{repos['url']}:main"), out)
    (out / "my-notes.txt").write_text("mine")
    report = download(parse_source(f"{repos['url']}:{VARIANT}"), out)
    assert report.verified == ["tokenizer/tokenizer.json"]
    assert report.left_over == ["scripts/convert.sh"]  # main's file, not in the variant: kept, reported
    files = user_files(out)
    assert (out / "my-notes.txt").read_text() == "mine"
    assert {k: v for k, v in files.items() if k in BRANCHES[VARIANT]} == BRANCHES[VARIANT]
    assert set(manifest(out)["files"]) == set(BRANCHES[VARIANT])


def test_missing_branch_lists_the_remote_branches(repos, tmp_path):
    with pytest.raises(DownloadError, match="no-such-branch") as err:
        download(parse_source(f"{repos['url']}:no-such-branch"), tmp_path / "out")
    assert "main" in str(err.value) and VARIANT in str(err.value)


def test_unreachable_remote_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match="fetching branch 'main'"):
        download(Source("git", (tmp_path / "nothing.git").as_uri(), "main"), tmp_path / "out")


def test_resume_rewrites_only_damaged_files(repos, tmp_path):
    out = tmp_path / "out"
    source = parse_source(f"{repos['url']}:main")
    download(source, out)
    # Pin every mtime to a fixed past value, so "untouched" is exact whatever the clock resolution.
    old_ns = 1_000_000_000 * 10**9
    for name in BRANCHES["main"]:
        os.utime(out / name, ns=(old_ns, old_ns))
    config = bytearray((out / "config.json").read_bytes())
    config[3] ^= 0xFF  # same size: only the hash can tell
    (out / "config.json").write_bytes(bytes(config))
    os.utime(out / "config.json", ns=(old_ns, old_ns))
    (out / "README.md").unlink()
    (out / "model.safetensors.incomplete").write_bytes(b"half a model")  # a killed run's leftover

    report = download(source, out)

    assert sorted(report.written) == ["README.md", "config.json"]
    assert sorted(report.verified) == ["model.safetensors", "scripts/convert.sh", "tokenizer/tokenizer.json"]
    assert report.bytes_written == len(BRANCHES["main"]["README.md"]) + len(BRANCHES["main"]["config.json"])
    assert user_files(out) == BRANCHES["main"]
    assert incomplete_files(out) == []
    for name in report.verified:
        assert (out / name).stat().st_mtime_ns == old_ns
    assert (out / "config.json").stat().st_mtime_ns != old_ns


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from quantpress.release.download import download, parse_source

    def progress(name, done, total):
        # Die inside the big file, after README.md and config.json are in place.
        if name == "model.safetensors" and 0 < done < total:
            assert Path(sys.argv[2], "README.md").exists()
            os.kill(os.getpid(), signal.SIGKILL)

    download(parse_source(sys.argv[1]), Path(sys.argv[2]), progress=progress)
""")


def test_killed_download_leaves_no_partial_file_and_resumes(repos, tmp_path):
    out = tmp_path / "out"
    spec = f"{repos['url']}:main"
    killed = subprocess.run([sys.executable, "-c", KILLER, spec, str(out)], capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # Whatever is under a final name is whole; the interrupted file exists only as `.incomplete`.
    expected = BRANCHES["main"]
    assert not (out / "model.safetensors").exists()
    partial = (out / "model.safetensors.incomplete").read_bytes()
    assert 0 < len(partial) < MODEL_SIZE
    on_disk = user_files(out)
    del on_disk["model.safetensors.incomplete"]
    assert on_disk and all(expected[name] == content for name, content in on_disk.items())

    report = download(parse_source(spec), out)
    assert "model.safetensors" in report.written
    assert set(on_disk) <= set(report.verified)  # what the killed run finished is not fetched again
    assert user_files(out) == expected
    assert incomplete_files(out) == []


# ----------------------------------------------------------------------------------------------
# Finding 2: a download never writes over files it did not put there


def test_a_folder_with_someone_elses_files_is_refused_before_fetching(repos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own readme")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a quantpress download"):
        download(parse_source(f"{repos['url']}:main"), out)
    assert user_files(out) == {"README.md": b"my own readme", "notes/todo.txt": b"mine"}
    assert not (out / ".cache").exists()  # nothing fetched, nothing written


def test_a_download_of_another_source_is_not_overwritten(repos, tmp_path):
    out = tmp_path / "out"
    download(parse_source(f"{repos['url']}:main"), out)
    before = user_files(out)
    with pytest.raises(OutputExistsError, match=f"holds a download of {repos['url']}, not of {repos['path']}"):
        download(parse_source(f"{repos['path']}:main"), out)
    assert user_files(out) == before and manifest(out)["source"]["location"] == repos["url"]


def test_empty_folders_and_the_same_source_are_fine(repos, tmp_path):
    out = tmp_path / "out"
    (out / "empty-subfolder").mkdir(parents=True)  # folders alone hold nothing to overwrite
    download(parse_source(f"{repos['url']}:main"), out)
    report = download(parse_source(f"{repos['url']}:{VARIANT}"), out)
    assert user_files(out) | BRANCHES[VARIANT] == user_files(out)
    assert report.commit == manifest(out)["commit"]


def test_the_folder_is_claimed_before_the_first_file_arrives(repos, tmp_path, monkeypatch):
    """A download killed before it finishes still owns its folder: its re-run is not refused."""
    out = tmp_path / "out"
    source = parse_source(f"{repos['url']}:main")

    def die(*args, **kwargs):
        assert manifest(out)["source"] == {"kind": "git", "location": repos["url"], "branch": "main"}
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dl, "_install", die)
        with pytest.raises(KeyboardInterrupt):
            download(source, out)
    download(source, out)
    assert user_files(out) == BRANCHES["main"]


def test_the_location_is_checked_before_fetching(repos, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        download(parse_source(f"{repos['url']}:main"), a_file / "out")
    with pytest.raises(ConfigError, match="is the source repository"):
        download(parse_source(f"{repos['path']}:main"), Path(repos["path"]))
    with pytest.raises(ConfigError, match="lies inside the source repository"):
        download(parse_source(f"{repos['path']}:main"), Path(repos["path"]) / "out")
    assert a_file.read_text() == "mine" and not (Path(repos["path"]) / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_location_is_a_config_error(repos, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            download(parse_source(f"{repos['url']}:main"), parent / "out")
    finally:
        parent.chmod(0o700)


# ----------------------------------------------------------------------------------------------
# Git LFS pointers in a local remote


LFS_OBJECT = random.Random(2).randbytes(300_000)
LFS_OID = hashlib.sha256(LFS_OBJECT).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@pytest.fixture
def lfs_repo(tmp_path) -> dict[str, Path]:
    """A repo whose model.safetensors is an LFS pointer, as a work tree and as a bare clone,
    neither holding the object yet."""
    work = tmp_path / "lfs-work"
    work.mkdir()
    git(work, "init", "-q")
    commit_files(work, "main", {"config.json": b"{}\n", "model.safetensors": lfs_pointer(LFS_OID, len(LFS_OBJECT))})
    git(tmp_path, "clone", "-q", "--bare", str(work), str(tmp_path / "lfs.git"))
    return {"work": work, "bare": tmp_path / "lfs.git"}


def store_lfs_object(store: Path, content: bytes, oid: str = LFS_OID) -> None:
    path = store / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.mark.parametrize("layout", ["bare", "work"])
def test_lfs_object_from_local_remote(lfs_repo, tmp_path, layout):
    remote = lfs_repo[layout]
    store_lfs_object(remote if layout == "bare" else remote / ".git", LFS_OBJECT)
    spec = remote.as_uri() if layout == "bare" else str(remote)
    out = tmp_path / "out"
    report = download(parse_source(spec), out)
    assert (out / "model.safetensors").read_bytes() == LFS_OBJECT
    entry = manifest(out)["files"]["model.safetensors"]
    assert entry == {"size": len(LFS_OBJECT), "sha1": entry["sha1"], "sha256": LFS_OID, "lfs": True}
    # A re-run verifies the object by its sha256 instead of fetching it again.
    assert "model.safetensors" in download(parse_source(spec), out).verified
    assert report.total_bytes == len(LFS_OBJECT) + 3


def test_lfs_object_missing(lfs_repo, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=f"LFS.*{LFS_OID}.*git lfs fetch"):
        download(parse_source(lfs_repo["bare"].as_uri()), out)
    assert not (out / "model.safetensors").exists() and incomplete_files(out) == []


def test_lfs_object_corrupt(lfs_repo, tmp_path):
    store_lfs_object(lfs_repo["bare"], LFS_OBJECT[:-1] + b"\0")
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="model.safetensors: the fetched content does not match"):
        download(parse_source(lfs_repo["bare"].as_uri()), out)
    assert not (out / "model.safetensors").exists() and incomplete_files(out) == []


def test_lfs_from_network_remote_is_refused():
    pointer = dl._LfsPointer(LFS_OID, len(LFS_OBJECT))
    with pytest.raises(DownloadError, match="cannot fetch LFS content"):
        dl._lfs_object(Source("git", "https://example.invalid/org/model.git", "main"), pointer, "model.safetensors")


# ----------------------------------------------------------------------------------------------
# Hub downloads, with huggingface_hub's RepoFile and a fake transport


HUB_FILES = {"config.json": b'{"bits": 4}\n', "model.safetensors": LFS_OBJECT}


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoFile

    served = dict(HUB_FILES)
    calls: dict[str, object] = {}

    class FakeInfo:
        sha = "c0ffee" * 6 + "c0ff"

    class FakeApi:
        def model_info(self, repo_id, *, revision=None):
            calls["model_info"] = (repo_id, revision)
            return FakeInfo()

        def list_repo_tree(self, repo_id, *, revision=None, recursive=False):
            calls["list_repo_tree"] = (repo_id, revision, recursive)
            yield RepoFile(path="config.json", size=len(HUB_FILES["config.json"]),
                           oid=git_blob_id(HUB_FILES["config.json"]))
            yield RepoFile(path="model.safetensors", size=len(LFS_OBJECT), oid="0" * 40,
                           lfs={"size": len(LFS_OBJECT), "oid": LFS_OID, "pointerSize": 134})

    def fake_snapshot_download(repo_id, *, revision=None, local_dir=None):
        calls["snapshot_download"] = (repo_id, revision)
        for name, content in served.items():
            Path(local_dir, name).write_bytes(content)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return served, calls


def test_hub_download_verifies_against_listing(fake_hub, tmp_path):
    _, calls = fake_hub
    out = tmp_path / "out"
    report = download(parse_source(f"org/model:{VARIANT}"), out)
    commit = "c0ffee" * 6 + "c0ff"
    # The branch is pinned to one commit, and both the listing and the files come from it.
    assert calls == {"model_info": ("org/model", VARIANT), "list_repo_tree": ("org/model", commit, True),
                     "snapshot_download": ("org/model", commit)}
    assert report.commit == commit and sorted(report.written) == sorted(HUB_FILES)
    recorded = manifest(out)
    assert recorded["source"] == {"kind": "hub", "location": "org/model", "branch": VARIANT}
    assert recorded["files"]["model.safetensors"]["sha256"] == LFS_OID


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_hub_download_mismatch_names_the_file(fake_hub, tmp_path, name):
    served, _ = fake_hub
    served[name] = served[name][:-1] + b"?"
    with pytest.raises(DownloadError, match=f"{name} does not match the Hub's checksum"):
        download(parse_source("org/model"), tmp_path / "out")
