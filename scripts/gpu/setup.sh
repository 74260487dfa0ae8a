#!/usr/bin/env bash
# kv3d's GPU set-up, in two halves of one script.
#
#   scripts/gpu/setup.sh prepare      HERE (a machine with pip and the llama-cpp-python sdist):
#                                     writes the carry folders .gpusrc/ (trimmed llama-cpp-python
#                                     source) and .whl/ (cp312 manylinux wheels kv3d needs that the
#                                     GPU image lacks), and lists both in .git/info/exclude.
#   scripts/gpu/setup.sh install      THERE: installs .whl/ into $KV3D_SITE (default /tmp/site) and
#                                     registers kv3d's llama.cpp backend plugin (entry point) there.
#   scripts/gpu/setup.sh build        THERE: builds llama-cpp-python with CUDA (sm_90) into $KV3D_SITE,
#                                     with the system GCC (see below), then checks it loads a model.
#   scripts/gpu/setup.sh env          prints the exports a shell needs to use the result.
#
# The libstdc++ fix. The GPU image puts a second GCC in /opt/gcc. A build with it links
# libllama/libggml-cuda against /opt/gcc's C++ runtime while the process loads the system
# libstdc++.so.6 (one soname, first loaded wins): it crashed in llama_model::print_info
# (2026-11). `build` therefore compiles C, C++ AND the CUDA host side with the system compiler
# (CC/CXX/CUDAHOSTCXX = /usr/bin/gcc, /usr/bin/g++), whose runtime is the libstdc++ every process
# loads. Where no system g++ exists it links the C++ runtime statically into each library and keeps
# its symbols private (-static-libstdc++ -static-libgcc -Wl,--exclude-libs,ALL), so no library can
# bind to a different libstdc++. The check afterwards loads a model in a fresh process; if that
# still fails and LD_PRELOAD of the system libstdc++ would fix it, it says so and writes the
# LD_PRELOAD into $KV3D_SITE/kv3d-gpu.env (a fallback that the log marks as such).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SITE="${KV3D_SITE:-/tmp/site}"
SDIST="${KV3D_LLAMA_SDIST:-/tmp/dl/llama_cpp_python-0.3.36.tar.gz}"
SRC="$REPO/.gpusrc/llama_cpp_python"
WHL="$REPO/.whl"
PY="${PYTHON:-python3}"

# name==version: what kv3d (+ llama_cpp, gguf) import that the GPU image does not hold (KINDS.md list)
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.54.0
  hydra-core==1.3.8 omegaconf==2.3.1 zstandard==0.25.0 diskcache==5.6.3 gguf==0.19.0 opentelemetry-api==1.45.2
  py-spy==0.4.3 redis==8.2.0 openai==3.63.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1 setuptools==84.2.1 wheel==0.48.0 packaging==26.4 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)   # pure Python, published as an sdist only: built here

prepare() {
  cd "$REPO"
  mkdir -p .git/info
  for p in /.gpusrc/ /.whl/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done

  rm -rf .gpusrc && mkdir -p .gpusrc
  tar -xzf "$SDIST" -C .gpusrc
  mv .gpusrc/llama_cpp_python-* "$SRC"
  local v="$SRC/vendor/llama.cpp"
  # nothing the library and llama-server builds need: models, docs, tests, examples, the web UI's
  # sources (the server embeds none: LLAMA_BUILD_UI=OFF), other GPU backends. tools/ stays (the
  # server's CMake adds every tool's folder), scripts/ keeps only what CMake runs.
  rm -rf "$SRC"/{.git,.github,docs,examples,tests,docker,scripts} \
         "$v"/{.git,models,docs,tests,examples,benches,media,gguf-py,pocs,app,conversion,ci,grammars,skills,requirements,.github,.devops} \
         "$v"/tools/ui/{src,tests,static,package-lock.json} \
         "$v"/ggml/src/ggml-{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn}
  find "$v"/scripts -mindepth 1 ! -name ui-assets.cmake -delete
  find "$v" -name '*.py' -path '*/convert*' -delete

  rm -rf "$WHL" && mkdir -p "$WHL"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${WHEELS[@]}"
  "$PY" -m pip wheel -q --no-deps -w "$WHL" "${SDIST_ONLY[@]}"
  du -sh .gpusrc .whl
  echo "carry: .gpusrc .whl   ($(du -scm .gpusrc .whl | tail -1 | cut -f1) MiB of the 64 MiB a call may carry)"
}

install_wheels() {
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
  # kv3d runs from the checkout (PYTHONPATH); its backend plugin is found through its entry point
  local di="$SITE/kv3d_backend_llamacpp-0.1.0.dist-info"
  mkdir -p "$di"
  printf 'Metadata-Version: 2.1\nName: kv3d-backend-llamacpp\nVersion: 0.1.0\n' > "$di/METADATA"
  printf '[kv3d]\nbackend_llamacpp = kv3d_backend_llamacpp.plugin\n' > "$di/entry_points.txt"
  env_file
}

env_file() {
  local f="$SITE/kv3d-gpu.env"
  [ -f "$f" ] && grep -q LD_PRELOAD "$f" && return 0
  echo "export PYTHONPATH=$SITE:$REPO:$REPO/plugins/backend_llamacpp" > "$f"
}

build() {
  cd "$SRC"
  local cxx_flags=() how
  echo "build: g++ on PATH: $(type -ap g++ | paste -sd' '); CC=${CC:-} CXX=${CXX:-}; /opt/gcc: $(ls /opt/gcc/bin 2>/dev/null | paste -sd' ')"
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
    cxx_flags=(-DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++)
    # keep /opt/gcc off the PATH so no tool of the build picks it up
    export PATH="$(echo "$PATH" | tr ':' '\n' | grep -v '^/opt/gcc' | paste -sd:)"
    how="system compiler $(/usr/bin/g++ -dumpfullversion)"
  else
    cxx_flags=(-DCMAKE_SHARED_LINKER_FLAGS="-static-libstdc++ -static-libgcc -Wl,--exclude-libs,ALL")
    how="static C++ runtime ($(g++ -dumpfullversion 2>/dev/null || echo '?'), no system g++)"
  fi
  echo "build: $how; nvcc $(nvcc --version | tail -2 | head -1)"
  export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF ${cxx_flags[*]:-}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  local t0=$SECONDS
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --upgrade --target "$SITE" .
  echo "build: done in $((SECONDS - t0)) s"
  local lib="$SITE/llama_cpp/lib"
  for f in libllama.so libggml-cuda.so; do
    echo "== $f"; { command -v readelf >/dev/null && readelf -d "$lib/$f" | grep -E 'NEEDED|RUNPATH|RPATH'; } || true
    ldd "$lib/$f" | grep -E 'stdc\+\+|cudart|cublas' || true
  done
  env_file
  check
}

check() {
  # a fresh process loads a small synthetic model on the GPU and decodes
  . "$SITE/kv3d-gpu.env"
  local m=/tmp/kv3d-check.gguf code='
import sys, numpy as np
from kv3d_core.plugins import make_plugin_manager
from kv3d_core.contracts.backend import BatchEntry
b = make_plugin_manager().create("backend", "llamacpp", model_path=sys.argv[1], hot_mb=64, n_seq_max=4, n_gpu_layers=-1)
(o,) = b.decode([BatchEntry(0, list(range(300, 700)), 0, True)])
print("check: ok, gpu_offload=%s, logits finite=%s" % (b.info.build["gpu_offload"], bool(np.isfinite(b.logits(o)).all())))
b.close()'
  [ -f "$m" ] || "$PY" -m kv3d_core.cli synth-model --shape qwen2.5-0.5b --layers 4 --out "$m"
  local rc=0
  "$PY" -c "$code" "$m" || rc=$?
  [ $rc = 0 ] && return 0
  echo "check: FAILED without LD_PRELOAD (rc=$rc); trying LD_PRELOAD of the system libstdc++"
  local sys_cxx=/lib/x86_64-linux-gnu/libstdc++.so.6
  if LD_PRELOAD=$sys_cxx "$PY" -c "$code" "$m"; then
    echo "export LD_PRELOAD=$sys_cxx   # FALLBACK: the clean build still crashed" >> "$SITE/kv3d-gpu.env"
    return 0
  fi
  return 1
}

case "${1:-}" in
  prepare) prepare ;;
  install) install_wheels ;;
  build) build ;;
  check) check ;;
  env) env_file; cat "$SITE/kv3d-gpu.env" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
