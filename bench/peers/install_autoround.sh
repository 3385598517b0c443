#!/usr/bin/env bash
# A virtualenv with AutoRound (intel/auto-round 0.16.1) on CPU, for the peer benchmarks only.
# torch 2.13.0 (CPU wheel, the project's version) goes in first and is pinned by a constraints
# file, so auto-round's unpinned `torch` requirement cannot swap it for a CUDA build. auto-round
# then brings accelerate, datasets, transformers, pydantic, py-cpuinfo. Its `[cpu]` extra (numba,
# tbb, auto-round-lib) only serves inference kernels and is not needed to quantize and export.
# Usage: install_autoround.sh VENV_DIR
set -euo pipefail
VENV=${1:?usage: install_autoround.sh VENV_DIR}
bash "$(dirname "$0")/../../tests/peers/torch_venv.sh" "$VENV"
CONSTRAINTS="$VENV/torch-constraints.txt"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" auto-round==0.16.1 tokenizers
"$VENV/bin/python" -c "import auto_round, torch; print('auto-round', auto_round.__version__, 'torch', torch.__version__)"
