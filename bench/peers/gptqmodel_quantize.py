"""Bench entry point for GPTQModel — runs in the GPTQModel venv only.

    GPTQMODEL_CPU_WORKERS=2 PEER_PY bench/peers/gptqmodel_quantize.py MODEL_DIR OUT_DIR \
        --bits 4 --group-size 128 --no-desc-act --sym --damp 0.1 \
        --examples calib.safetensors --dtype float32

The same runner the interop tests use (tests/peers/gptqmodel_quantize.py), executed unchanged so
the benchmark and the fixtures cannot drift apart: same CLI, same pinned classic-GPTQ settings.
Its last stdout line is JSON with quantize_seconds, peak_rss_mib, tool and version. Its output is
a GPTQ folder that `quantpress.load` reads directly. Run it from a scratch cwd (GPTQModel writes
./logs/ there).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "tests" / "peers" / "gptqmodel_quantize.py"

if __name__ == "__main__":
    sys.argv[0] = str(RUNNER)
    runpy.run_path(str(RUNNER), run_name="__main__")
