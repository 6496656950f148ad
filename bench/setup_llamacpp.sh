#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist (which vendors llama.cpp) for
# bench/llamacpp.py. Not part of `make install` or CI: it compiles for minutes.
#
# It installs into a separate target directory (default: .llamacpp/ at the repo
# root, git-ignored), not into the project venv, so the project's own numpy etc.
# stay untouched; bench/llamacpp.py appends that directory to sys.path.
#
#   bench/setup_llamacpp.sh                 # native build into .llamacpp/
#   LLAMACPP_DIR=/elsewhere bench/setup_llamacpp.sh
#
# Build flags: GGML_NATIVE=ON compiles for this CPU (-march=native: AVX-512,
# AVX512-BF16, AVX512-VNNI), which is llama.cpp's best case on the machine the
# benchmark runs on. GGML_LLAMAFILE (tinyBLAS sgemm for prefill), OpenMP and the
# runtime weight repacking (Q4_0/Q4_K/IQ4_NL) are llama.cpp's defaults and stay on.
# Tests/tools/examples and the multimodal (llava/mtmd) library are off.
#
# AMX is compiled out by default (-mno-amx-*, which GCC honours over -march=native):
# with it, llama.cpp 0.3.36's AMX buffer type takes the Q8_0/Q4 weights and the
# first llama_decode segfaults in ggml_backend_amx_mul_mat on SmolLM2-135M (Xeon
# with AMX, gdb backtrace; cf. upstream ggml-org/llama.cpp#20824). LLAMACPP_AMX=1
# builds it in anyway, for machines where it works.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
DEST="${LLAMACPP_DIR:-$ROOT/.llamacpp}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

if [ ! -x "$PY" ]; then
    echo "setup_llamacpp.sh: no python at $PY (run 'make install' or set PY=...)" >&2
    exit 1
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "setup_llamacpp.sh: '$tool' not found" >&2; exit 1; }
done

export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
if [ "${LLAMACPP_AMX:-0}" != "1" ]; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${EXTRA_CMAKE_ARGS:-}"

echo "building llama-cpp-python==$VERSION into $DEST (CMAKE_ARGS=$CMAKE_ARGS CXXFLAGS=${CXXFLAGS:-}, $JOBS jobs)"
# --no-deps: numpy/jinja2/typing-extensions come from the project venv; only
# diskcache (imported by llama_cpp at import time) is missing there.
nice -n 19 "$PY" -m pip install --no-cache-dir --upgrade --target "$DEST" --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" "diskcache==5.6.3"

# Smoke check: the library loads and reports the CPU features it was built with.
PYTHONPATH="$DEST" LLAMACPP_AMX="${LLAMACPP_AMX:-0}" "$PY" -c '
import os, sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print("llama_cpp", llama_cpp.__version__, "|", info)
if os.environ["LLAMACPP_AMX"] != "1" and "AMX" in info:
    sys.exit("setup_llamacpp.sh: AMX was meant to be compiled out but the library reports it")
'
