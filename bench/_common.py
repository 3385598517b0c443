"""What every bench script shares: the machine description, child processes measured with their
own peak RSS, markdown tables, and writing a script's section of BENCHMARKS.md.

Bench scripts measure; they are never imported by quantpress or by the tests.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def machine() -> str:
    """One line naming the machine: cores, memory, CPU model, software, date."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"`nproc` = {os.cpu_count()}, {mem_gib:.0f} GiB RAM, {cpu}, Python {platform.python_version()}, "
            f"date {datetime.date.today().isoformat()}")


def command_line() -> str:
    """The command that produced a table, as a reader would retype it."""
    return shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


@dataclass(frozen=True)
class ChildRun:
    wall_s: float  # the whole process: start-up, imports, model load, work, save
    peak_rss_mib: float  # the child's own high-water mark (wait4), not the parent's
    result: dict  # the JSON object printed on the child's last stdout line
    stdout: str


def run_child(argv: Sequence[str], *, cwd: Path | None = None, env: dict | None = None) -> ChildRun:
    """Run a process, returning its wall time, its peak RSS and its last stdout line as JSON.

    `os.wait4` reports the rusage of exactly this child. Linux carries `ru_maxrss` across fork
    and exec, so the parent of a measured child must stay small: bench parents never import torch.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: Popen must not wait again
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"child failed ({proc.returncode}): {shlex.join(argv)}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return ChildRun(wall, usage.ru_maxrss / 1024, json.loads(lines[-1]) if lines else {}, stdout)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the block between `<!-- bench:NAME -->` markers in BENCHMARKS.md,
    so each script rewrites only its own section and hand-written text around it survives."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS_MD)
