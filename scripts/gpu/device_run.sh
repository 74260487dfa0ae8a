#!/usr/bin/env bash
# The whole GPU job, run ON the device machine from the repository root:
#
#   scripts/gpu/device_run.sh [SECONDS]
#
# The first call starts the pipeline (scripts/gpu/pipeline.sh: install wheels, build llama-cpp-python
# and llama-server with CUDA through the README's scripts/setup.sh, write the synthetic
# Qwen2.5-1.5B-shaped model, serve it, run kv3d bench side by side with llama-server) as its own
# process session (setsid), so it outlives the call; every call then waits up to SECONDS (default 560)
# for it and copies what exists to $OUT: pipeline.log, setup.log, serve.log, results.tgz, servers.log.
# A second call while the machine is still warm just keeps waiting for the same pipeline (which runs
# from a copy of the tree, so the second call's fresh copy does not touch it).
set -u
W=${KV3D_GPU_WORK:-/tmp/kv3d-gpu}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
deadline=$((SECONDS + ${1:-560}))
if [ ! -e "$W/started" ]; then
  date > "$W/started"
  # the pipeline runs from its own copy of the tree: the next call's copy of the working tree
  # (refreshed by the device tool) must not change files under a running server
  rm -rf "$W/src" && mkdir -p "$W/src" && tar -cf - --exclude=./.venv --exclude=./.git . | tar -xf - -C "$W/src"
  (cd "$W/src" && setsid bash scripts/gpu/pipeline.sh > "$W/pipeline.log" 2>&1 < /dev/null &)
  echo "pipeline started in $W/src"
else
  echo "pipeline already running since $(cat "$W/started")"
fi
while [ $SECONDS -lt $deadline ] && [ ! -e "$W/done" ]; do sleep 3; done
[ -e "$W/done" ] && echo "pipeline finished: $(cat "$W/done")" || echo "pipeline still running at the deadline"
cp -f "$W/pipeline.log" "$OUT/" 2>/dev/null
tail -c 200000 "$W/setup.log" > "$OUT/setup.log" 2>/dev/null
tail -c 50000 "$W/serve.log" > "$OUT/serve.log" 2>/dev/null
# the reports (JSON, Markdown, plots, request lines), not the servers' own logs
[ -d "$W/results" ] && tar -czf "$OUT/results.tgz" -C "$W" --exclude='*/kv3d*.log' --exclude='*/llama_server*.log' results
for f in "$W"/results/*/llama_server.log "$W"/results/*/kv3d.log; do
  [ -e "$f" ] && { echo "== $f"; tail -c 8000 "$f"; }; done > "$OUT/servers.log" 2>/dev/null
tail -n 80 "$W/pipeline.log"
