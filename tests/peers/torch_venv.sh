#!/usr/bin/env bash
# The first step of every peer venv: a fresh venv with the project's torch (2.13.0, the CPU wheel)
# installed first, and a constraints file at VENV/torch-constraints.txt that pins it, so a peer's
# resolver cannot swap it for a multi-GB CUDA build. The one place the peers' torch is pinned.
# Usage: torch_venv.sh VENV_DIR
set -euo pipefail
VENV=${1:?usage: torch_venv.sh VENV_DIR}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
echo torch==2.13.0 > "$VENV/torch-constraints.txt"
