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
# AVX512-BF16, VNNI and, on Xeons that have it, AMX), which is llama.cpp's best
# case on the machine the benchmark runs on. GGML_LLAMAFILE (tinyBLAS sgemm for
# prefill) and OpenMP are llama.cpp's defaults and stay on. Tests/tools/examples
# and the multimodal (llava/mtmd) library are off to keep the build short.
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
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${EXTRA_CMAKE_ARGS:-}"

echo "building llama-cpp-python==$VERSION into $DEST (CMAKE_ARGS=$CMAKE_ARGS, $JOBS jobs)"
# --no-deps: numpy/jinja2/typing-extensions come from the project venv; only
# diskcache (imported by llama_cpp at import time) is missing there.
nice -n 19 "$PY" -m pip install --no-cache-dir --upgrade --target "$DEST" --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" "diskcache==5.6.3"

# Smoke check: the library loads and reports the CPU features it was built with.
PYTHONPATH="$DEST" "$PY" -c '
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print("llama_cpp", llama_cpp.__version__, "|", info)
'
