#!/usr/bin/env bash
# Started by scripts/gpu/device_run.sh (own process session); writes $W/done when finished.
set -u
W=${KV3D_GPU_WORK:-/tmp/kv3d-gpu}
export KV3D_SITE=${KV3D_SITE:-/tmp/site} PYTHONUNBUFFERED=1
trap 'echo "rc=$? at $(date +%T)" > "$W/done"' EXIT
t0=$SECONDS
echo "== $(date +%T) install"
bash scripts/gpu/setup.sh install || exit 1
. "$KV3D_SITE/kv3d-gpu.env"
echo "== $(date +%T) build (background) + synthetic model"
( bash scripts/gpu/setup.sh build > "$W/build.log" 2>&1; echo $? > "$W/build.rc" ) &
build_pid=$!
MODEL=$W/qwen2.5-1.5b.gguf
[ -f "$MODEL" ] || python3 -m kv3d_core.cli synth-model --shape qwen2.5-1.5b --out "$MODEL"
wait $build_pid
echo "== $(date +%T) build rc=$(cat "$W/build.rc") after $((SECONDS - t0)) s"
grep -E '^(build|check|==)|RUNPATH|stdc' "$W/build.log"
[ "$(cat "$W/build.rc")" = 0 ] || { tail -n 80 "$W/build.log"; exit 1; }
. "$KV3D_SITE/kv3d-gpu.env"       # may now hold the LD_PRELOAD fallback
echo "== $(date +%T) bench"
python3 scripts/gpu/bench_gpu.py --model "$MODEL" --out "$W/results.json" --workdir "$W" ${KV3D_BENCH_ARGS:-}
echo "== $(date +%T) bench done after $((SECONDS - t0)) s"
