#!/usr/bin/env bash
# A virtualenv with GPTQModel 7.7.0 on CPU, as a new user gets it working here (see
# shared/reference/peers-on-cpu.md): GPTQModel declares torch>=2.14.1, which would pull CUDA
# wheels, so torch 2.13.0 goes first, then GPTQModel's own requirements without torch, then
# GPTQModel itself without dependency resolution, then optimum (transformers 5.23 comes along).
# Usage: install_gptqmodel.sh VENV_DIR
set -euo pipefail
VENV=${1:?usage: install_gptqmodel.sh VENV_DIR}
bash "$(dirname "$0")/torch_venv.sh" "$VENV"
CONSTRAINTS="$VENV/torch-constraints.txt"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "accelerate>=1.15.0" "numpy>=2.4.6" "safetensors>=0.8.0" \
  "filelock>=4.2.4" "transformers>=5.20.2" "threadpoolctl>=3.7.0" "packaging>=26.3" "device-smi>=0.5.7" \
  "protobuf>=7.36.2" "pillow>=13.0.0" "requests>=2.34.2" "pypcre>=0.6.4" "tokenicer>=0.0.14" \
  "logbar>=0.4.15" "jinja2>=3.1.6" "ninja>=1.13.2" "maturin>=1.15.0" "datasets>=5.1.0" \
  "pyarrow>=26.0.0" "dill>=0.4.1" "torchao>=0.18.0" "defuser>=0.0.28"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" --no-deps gptqmodel==7.7.0
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" optimum==2.3.0 tokenizers
