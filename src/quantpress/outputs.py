"""Where quantpress may write: never into its own inputs, never over what it did not write.

Every command that writes a folder (quantize, release, download, LoRA merge) runs these checks
before any expensive work starts, so a mistyped path fails in milliseconds and loses nothing:

- `check_disjoint`: the output may not be, contain or sit inside an input (`quantize M M
  --overwrite` once deleted the source model).
- `check_writable`: the output's location can be written (probed with a real file, since
  `os.access` says yes to root on a read-only mount).
- `check_replaceable`: an existing output is replaced only when asked to AND when quantpress
  itself wrote it; what counts as "ours" is decided by the writer, which knows its own marker.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from quantpress.errors import ConfigError, OutputExistsError


def resolved(path: str | os.PathLike) -> Path:
    """An absolute path with `~`, `..` and links resolved: `.` and `a/../b` name real folders."""
    return Path(path).expanduser().resolve()


def check_disjoint(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output folder that equals, contains or lies inside one of `inputs`
    ({what it is: path}; None entries are skipped)."""
    target = resolved(out)
    if target.parent == target:
        raise ConfigError(f"refusing to write output to the filesystem root {target}")
    for what, path in inputs.items():
        if path is None:
            continue
        source = resolved(path)
        if target == source:
            raise ConfigError(f"the output {out} is the {what} {path} itself; choose another output folder")
        if source.is_relative_to(target):
            raise ConfigError(f"the output {out} contains the {what} {path}; choose another output folder")
        if target.is_relative_to(source):
            raise ConfigError(f"the output {out} lies inside the {what} {path}; choose a folder outside it")


def check_writable(out: str | os.PathLike) -> None:
    """Fail now, not after the work, if `out` cannot be written: probe it (an existing folder) or
    its nearest existing ancestor with a real temporary file (removed at once; nothing else is
    created)."""
    target = resolved(out)
    ancestor = target if target.is_dir() else target.parent  # an existing folder is written into
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create {out}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantpress-probe-", dir=ancestor)
    except OSError as e:
        raise ConfigError(f"cannot write to {ancestor} ({e.strerror}); choose a writable output location") from None
    os.close(fd)
    os.unlink(probe)


def check_replaceable(out: str | os.PathLike, *, overwrite: bool, ours: Callable[[Path], str | None],
                      what: str = "output") -> None:
    """An existing `out` may only be replaced with `overwrite` and when `ours(out)` recognises it
    as quantpress's own; `ours` returns None for yes, else the reason it is not."""
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if path.is_symlink() or not path.is_dir():
        raise OutputExistsError(f"{out} is not a folder quantpress wrote; refusing to replace it")
    reason = ours(path)
    if reason is not None:
        raise OutputExistsError(f"{out} is not a {what} quantpress wrote ({reason}); refusing to replace it: "
                                "choose another output folder, or move it away yourself")
