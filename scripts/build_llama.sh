#!/usr/bin/env bash
# Build llama-cpp-python's wheel AND llama.cpp's own `llama-server` from the same source, in one
# CMake build tree, once; both are cached in the wheelhouse and every later call does nothing.
#
#   scripts/build_llama.sh            prints the variant directory holding the wheel and the server
#
# The source is the llama-cpp-python sdist (its vendor/llama.cpp is the llama.cpp commit the Python
# package binds to), so kv3d and its peer `llama-server` run exactly the same llama.cpp build: same
# commit, same CPU/CUDA flags. The wheel is built first (scikit-build-core, build tree kept), then
# the same tree is reconfigured with the tools on and only the `llama-server` target is built: the
# ggml/llama objects are reused, so the server costs only its own sources.
#
# Variant: `cpu`, or `cuda-sm<arch>` when a CUDA toolkit (nvcc) AND an NVIDIA GPU (nvidia-smi -L)
# are found, or KV3D_CUDA=1 (KV3D_CUDA=0 forces the CPU build; KV3D_CUDA_ARCH overrides the
# architecture read from the card, default 90). A toolkit without a card (a CI image) builds for CPU.
# Layout:  $KV3D_WHEELHOUSE/<variant>/llama_cpp_python-<v>-*.whl
#          $KV3D_WHEELHOUSE/<variant>/llama-server-<v>/{llama-server, llama-server.bin, lib*.so*}
#
# Offline (a machine without a package index): KV3D_LLAMA_SDIST=<the sdist .tar.gz, or its unpacked
# folder> skips the download; scikit-build-core and ninja already installed for $PYTHON are used.
set -euo pipefail

V=${LLAMA_CPP_VERSION:-0.3.36}
WHEELHOUSE=${KV3D_WHEELHOUSE:-$HOME/.cache/kv3d/wheelhouse}
PYTHON=${PYTHON:-python3}
log() { echo "kv3d build: $*" >&2; }

# ---- which build -----------------------------------------------------------------------------
cuda=${KV3D_CUDA:-auto}
if [ "$cuda" = auto ]; then
    cuda=0
    if command -v nvcc >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then cuda=1; fi
fi
cmake_args="-DLLAVA_BUILD=OFF"
if [ "$cuda" = 1 ]; then
    command -v nvcc >/dev/null 2>&1 || { log "KV3D_CUDA=1 but no nvcc on PATH"; exit 1; }
    arch=${KV3D_CUDA_ARCH:-}
    if [ -z "$arch" ] && command -v nvidia-smi >/dev/null 2>&1; then
        arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    fi
    arch=${arch:-90}
    variant="cuda-sm$arch"
    cmake_args="$cmake_args -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=OFF"
    # The system compiler for C, C++ and the CUDA host side, so every library binds to the
    # libstdc++ the process loads (scripts/gpu/README.md: a second GCC in /opt crashed at load).
    if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
        export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
        cmake_args="$cmake_args -DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++"
    fi
else
    variant=cpu
    # Portable x86-64 build (AVX2/FMA/F16C): faster to build, runs on any recent CPU.
    if [ "$(uname -m)" = "x86_64" ]; then
        cmake_args="$cmake_args -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
fi
cmake_args="$cmake_args ${KV3D_CMAKE_ARGS:-}"

OUTDIR="$WHEELHOUSE/$variant"
SERVER_DIR="$OUTDIR/llama-server-$V"
have_wheel() { ls "$OUTDIR"/llama_cpp_python-"$V"-*.whl >/dev/null 2>&1; }
if have_wheel && [ -x "$SERVER_DIR/llama-server" ]; then
    echo "$OUTDIR"
    exit 0
fi

# ---- one build tree --------------------------------------------------------------------------
mkdir -p "$OUTDIR"
WORK="$WHEELHOUSE/.build-$variant"
rm -rf "$WORK"
mkdir -p "$WORK"
log "building llama-cpp-python $V and llama-server ($variant) once, in $WORK (several minutes)"
t0=$SECONDS

# The build tools live in a venv of their own with a fixed path: the build tree records them, and
# the second configure must find the same cmake and ninja.
if "$PYTHON" -c "import scikit_build_core, ninja" 2>/dev/null; then
    BPY="$PYTHON"                        # the tools are there already (an offline machine, say)
    export PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
else
    "$PYTHON" -m venv "$WORK/venv"
    BPY="$WORK/venv/bin/python"
    "$BPY" -m pip --disable-pip-version-check -q install "scikit-build-core>=0.10" ninja
    export PATH="$WORK/venv/bin:$PATH"
fi
if ! command -v cmake >/dev/null 2>&1; then "$BPY" -m pip -q install cmake; fi

SDIST=${KV3D_LLAMA_SDIST:-}
if [ -z "$SDIST" ]; then
    "$BPY" -m pip --disable-pip-version-check -q download --no-binary :all: --no-deps \
        "llama-cpp-python==$V" -d "$WORK"
    SDIST="$WORK/llama_cpp_python-$V.tar.gz"
fi
if [ -d "$SDIST" ]; then
    cp -r "$SDIST" "$WORK/llama_cpp_python-$V"
else
    tar -xzf "$SDIST" -C "$WORK"
fi
SRC="$WORK/llama_cpp_python-$V"
BUILD="$WORK/tree"

jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    "$BPY" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation \
    --config-settings=build-dir="$BUILD" -w "$WORK/wheel" "$SRC" >"$WORK/wheel-build.log" 2>&1 || {
    tail -n 60 "$WORK/wheel-build.log" >&2; log "the wheel build failed (log: $WORK/wheel-build.log)"; exit 1; }
log "wheel built after $((SECONDS - t0)) s"

# Same tree, tools on (their configure must not download anything: no prebuilt web UI, no OpenSSL),
# with the cmake that configured it.
CMAKE=$(sed -n 's/^CMAKE_COMMAND:INTERNAL=//p' "$BUILD/CMakeCache.txt")
CMAKE=${CMAKE:-cmake}
# shellcheck disable=SC2086
"$CMAKE" -S "$SRC" -B "$BUILD" $cmake_args -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_TOOLS_INSTALL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$WORK/server-configure.log" 2>&1 || {
    tail -n 60 "$WORK/server-configure.log" >&2; log "configuring llama-server failed"; exit 1; }
"$CMAKE" --build "$BUILD" --target llama-server -j "$jobs" >"$WORK/server-build.log" 2>&1 || {
    tail -n 60 "$WORK/server-build.log" >&2; log "the llama-server build failed"; exit 1; }
log "llama-server built after $((SECONDS - t0)) s"

# Bundle: the binary, the shared libraries it was linked against from this tree, and a launcher
# that points the loader at them (the tree is deleted below).
bin="$BUILD/bin"
rm -rf "$SERVER_DIR.tmp" && mkdir -p "$SERVER_DIR.tmp"
cp "$bin/llama-server" "$SERVER_DIR.tmp/llama-server.bin"
cp -P "$bin"/lib*.so* "$SERVER_DIR.tmp/"
cat > "$SERVER_DIR.tmp/llama-server" <<'EOF'
#!/bin/sh
# llama.cpp's llama-server, built by kv3d's scripts/build_llama.sh with its own libraries beside it.
d=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/llama-server.bin" "$@"
EOF
chmod +x "$SERVER_DIR.tmp/llama-server"
{
    echo "llama_cpp_python=$V"
    echo "variant=$variant"
    echo "cmake_args=$cmake_args"
} > "$SERVER_DIR.tmp/BUILD-INFO"
LD_LIBRARY_PATH="$SERVER_DIR.tmp" "$SERVER_DIR.tmp/llama-server.bin" --version >>"$SERVER_DIR.tmp/BUILD-INFO" 2>&1 || {
    log "the built llama-server does not start:"; cat "$SERVER_DIR.tmp/BUILD-INFO" >&2; exit 1; }

rm -rf "$SERVER_DIR" && mv "$SERVER_DIR.tmp" "$SERVER_DIR"
rm -f "$OUTDIR"/llama_cpp_python-"$V"-*.whl
mv "$WORK"/wheel/llama_cpp_python-"$V"-*.whl "$OUTDIR/"
rm -rf "$WORK"
log "done in $((SECONDS - t0)) s: $OUTDIR"
echo "$OUTDIR"
