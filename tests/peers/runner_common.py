"""What every peer runner needs, whichever venv runs it (only torch and safetensors here): the
calibration windows as the caller saved them, and the runner's own peak RSS.

The runners are scripts, run as `PEER_PY path/to/runner.py ...`: tests/peers/ is on sys.path for
the GPTQModel runner (its own folder); bench/peers/ runners add it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_windows(path: str) -> torch.Tensor:
    """The int64 [n, seqlen] `input_ids` every tool is given, unchanged."""
    ids = load_file(path)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be int64 [n, seqlen], got {ids.dtype} {tuple(ids.shape)}")
    return ids


def vm_hwm_mib() -> float | None:
    """Peak RSS of this process image (Linux VmHWM). Unlike ru_maxrss, which exec inherits from
    the parent's high-water mark, it starts afresh at exec, so a big parent cannot inflate it."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    line = next((x for x in status if x.startswith("VmHWM:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None
