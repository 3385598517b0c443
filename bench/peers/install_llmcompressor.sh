#!/usr/bin/env bash
# A virtualenv with llm-compressor 0.14.0.1 on CPU (see shared/reference/peers-on-cpu.md), for the
# peer benchmarks only. torch 2.13.0 (CPU wheel, the project's version) goes in first and is pinned
# by a constraints file, so llm-compressor's resolver cannot swap it for a CUDA build; llm-compressor
# then brings its own pins (transformers 5.17.0, compressed-tensors 0.19.0).
# Usage: install_llmcompressor.sh VENV_DIR
set -euo pipefail
VENV=${1:?usage: install_llmcompressor.sh VENV_DIR}
bash "$(dirname "$0")/../../tests/peers/torch_venv.sh" "$VENV"
CONSTRAINTS="$VENV/torch-constraints.txt"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" llmcompressor==0.14.0.1 tokenizers
