#!/usr/bin/env bash
# llama-cpp-python 0.3.36 built from its sdist into a venv of its own, for the runtime bench and the
# GGUF tests. The built wheel is cached (building takes 3-12 min on 2 cores), and the sdist's
# vendored llama.cpp converter (convert_hf_to_gguf.py + gguf-py) is unpacked beside it.
#
#   bash bench/peers/install_llamacpp.sh [VENV_DIR]      (default .ci-work/peer-llamacpp)
#
# Build flags: a non-native AVX-512 build without AMX. The native build segfaults on the first
# eval on this project's AMX machines (../shared/reference/cpu-kernels-and-gguf.md §9).
set -euo pipefail
VERSION=0.3.36
VENV=${1:-.ci-work/peer-llamacpp}
CACHE=${QUANTPRESS_WHEEL_CACHE:-$HOME/.cache/quantpress/wheels}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
fi
if ! ls "$CACHE"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  if grep -q avx512f /proc/cpuinfo; then
    ISA="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  else
    ISA="-DGGML_AVX512=OFF"
  fi
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $ISA \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    "$PY" -m pip wheel -q --no-deps "$SDIST" -w "$CACHE"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$CACHE"/llama_cpp_python-$VERSION-*.whl
CONVERTER="$CACHE/llama.cpp-$VERSION"
if [ ! -f "$CONVERTER/convert_hf_to_gguf.py" ]; then
  mkdir -p "$CONVERTER"
  tar -xzf "$SDIST" -C "$CONVERTER" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "converter: $CONVERTER"
