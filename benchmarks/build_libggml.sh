#!/usr/bin/env bash
# Build llama.cpp's C reference quantizers (libggml-base.so) for bench_gguf.py and the differential
# tests (tests/golden/gguf/cref.py), outside the repository.
#
#   benchmarks/build_libggml.sh [build_dir]        # default /work/ggml-build (or $GGML_BUILD_DIR)
#   export QUANTCOURSE_LIBGGML=<build_dir>/bin/libggml-base.so
#
# The source is llama-cpp-python's sdist (it vendors llama.cpp; 0.3.36 vendors commit 0c1e570),
# fetched with pip, which needs no git. Only the ggml-base target is built: ggml_quantize_chunk and
# every quantize_row_*_ref live in ggml.c / ggml-quants.c there. GGML_NATIVE=OFF keeps the build
# portable (the reference functions are plain C either way); -j1 spares a shared machine (about a minute).
set -euo pipefail
BUILD=${1:-${GGML_BUILD_DIR:-/work/ggml-build}}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
SRC=${GGML_SRC_DIR:-$(dirname "$BUILD")/ggml-src}
PYTHON=${PYTHON:-python3}
mkdir -p "$SRC"
if [ ! -d "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/ggml" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$SRC"
    tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
# configured from llama.cpp's top level: the sdist leaves out ggml/ggml.pc.in, which a standalone ggml needs
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
cmake --build "$BUILD" --target ggml-base -j1
LIB=$(find "$BUILD" -name 'libggml-base.so' | head -n 1)
echo "built $LIB"
echo "export QUANTCOURSE_LIBGGML=$LIB"
