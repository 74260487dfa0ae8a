#!/usr/bin/env bash
# Benchmark kv3d against llama-cpp-python's own OpenAI server (`kv3d bench`).
# Installs kv3d and the bench extras into .venv on first use.
#
# Environment variables become overrides (unset ones keep plugins/tools/kv3d_tools/conf/bench.yaml's defaults):
#   REQUESTS SHARED_RATIO FAMILIES SYSTEM_PROMPT_TOKENS UNIQUE_TOKENS TURNS CONCURRENCY
#   MAX_TOKENS SEED OUT_DIR QUALITY
#   SYSTEMS=kv3d,kv3d_safe,llamacpp_peer   CODEC=int8   TIER=ssd   DETECTOR=radix
#   THREADS=2 (server.threads, also the peer's)   MODEL=/path/model.gguf   HOT_MB=512   WARM_MB=1024
# Arguments are passed on to `kv3d bench`, e.g. a sweep:
#   REQUESTS=200 scripts/bench.sh -m codec=none,int8 tier=ram,ssd
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${KV3D_VENV:-.venv}
PY="$VENV/bin/python"
if ! "$PY" -c 'import openai, matplotlib, llama_cpp.server.app' >/dev/null 2>&1; then
    echo "kv3d bench: installing the bench extras" >&2
    "$PY" -m pip --disable-pip-version-check -q install --find-links "${KV3D_WHEELHOUSE:-$HOME/.cache/kv3d/wheelhouse}" \
        -e ".[bench]" -e plugins/tools sse-starlette "starlette-context>=0.3.6,<0.4" pydantic-settings PyYAML
fi

args=()
add() { if [ -n "${2:-}" ]; then args+=("$1=$2"); fi; }
add requests "${REQUESTS:-}"
add shared_ratio "${SHARED_RATIO:-}"
add families "${FAMILIES:-}"
add system_prompt_tokens "${SYSTEM_PROMPT_TOKENS:-}"
add unique_tokens "${UNIQUE_TOKENS:-}"
add turns "${TURNS:-}"
add concurrency "${CONCURRENCY:-}"
add max_tokens "${MAX_TOKENS:-}"
add seed "${SEED:-}"
add out_dir "${OUT_DIR:-}"
add quality "${QUALITY:-}"
add server.threads "${THREADS:-}"
add model.path "${MODEL:-}"
add cache.gpu_hot_mb "${HOT_MB:-}"
add cache.ram_warm_mb "${WARM_MB:-}"
add codec "${CODEC:-}"
add tier "${TIER:-}"
add detector "${DETECTOR:-}"
if [ -n "${SYSTEMS:-}" ]; then args+=("systems=[${SYSTEMS}]"); fi
exec "$VENV/bin/kv3d" bench "${args[@]}" "$@"
