#!/usr/bin/env bash
# The whole GPU job, run ON the device machine from the repository root (started by
# scripts/gpu/device_run.sh as its own process session); writes $W/done when finished.
#
#   1. the README's set-up, offline: scripts/setup.sh with the carried sdist (.gpusrc) and wheels
#      (.whl) -- it finds nvcc and the GPU, so it builds llama-cpp-python AND llama-server with CUDA
#   2. a synthetic Qwen2.5-1.5B-shaped model (the machine has no model hub)
#   3. the README's serve command on it: the model on the GPU, one request, kv3d doctor
#      (KV3D_GPU_SKIP_SERVE=1 skips it)
#   4. kv3d bench, side by side with llama-server (KV3D_GPU_STAGES picks; default all, in order):
#        side     256 new sessions (80 % one 1,024-token prefix) then 128 second turns, token ids,
#                 64 generated, greedy; 32 and 64 clients, two rounds; kv3d vs llama-server (per-slot
#                 streams) vs llama-server --kv-unified
#        side2    the same without the --kv-unified variant (shorter; KV3D_GPU_CLIENTS="32" picks the client counts)
#        side32, side64   side2 at one client count (to order the stages freely)
#      KV3D_GPU_SET: overrides added to every kv3d bench run of the side and ab stages
#        unified  the same workload, kv3d with cache.layout=unified (the layout before issue 15)
#        ab       kv3d alone, one round per variant and client count: KV3D_GPU_AB holds the variants,
#                 ';'-separated, each a space-separated list of overrides (e.g.
#                 "scheduler.prefill_order=shortest;scheduler.prefill_order=fair")
#        stepmix  benchmarks/step_mix.py: a step's time by how its prefill tokens spread over sequences
#        decode   benchmarks/decode_overhead.py: kv3d vs raw batched llama_decode, 32 and 64 seqs
#        seed     the seed chat workload (100 requests) on the synthetic model
#        decodeprof  decode_overhead.py at 64 sequences, kv3d's server under py-spy while its timed
#                 decode runs: every thread (idle samples too), and only the thread holding the GIL
#                 (benchmarks/pyspy_summary.py --gil: how long the event loop holds it each step)
#        profile  one round of the side workload at 32 clients, kv3d under py-spy (every thread, idle
#                 samples too: where the scheduler thread's wall time goes) and GPU utilisation sampled
#                 every 100 ms
set -u
W=${KV3D_GPU_WORK:-/tmp/kv3d-gpu}
REPO=$(pwd)
mkdir -p "$W/results"
trap 'echo "rc=$? at $(date +%T)" > "$W/done"' EXIT
t0=$SECONDS
stamp() { echo "== $(date +%T) (+$((SECONDS - t0)) s) $*"; }

export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_FIND_LINKS="$REPO/.whl" PIP_DISABLE_PIP_VERSION_CHECK=1
export KV3D_LLAMA_SDIST="$REPO/.gpusrc/llama_cpp_python" KV3D_DEFAULT_MODEL=0 KV3D_USER_CONFIG=none
# kv3d goes into the image's own Python environment (a venv of its own would not see its packages)
export KV3D_VENV="$(python3 -c 'import sys; print(sys.prefix)')" KV3D_WHEELHOUSE="$W/wheelhouse"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

PY="$KV3D_VENV/bin/python"
# before the set-up: kv3d-tools (plugins/tools, which setup.sh installs with the other plugins) needs
# openai, which the image lacks (its other needs -- tqdm, psutil, matplotlib, httpx -- it holds)
"$PY" -m pip install -q --no-deps gguf openai distro jiter sniffio httpx2 httpcore2 truststore 2>&1 | tail -n 3
stamp "setup (scripts/setup.sh: CUDA build of llama-cpp-python and llama-server)"
if ! scripts/setup.sh > "$W/setup.log" 2>&1; then tail -n 60 "$W/setup.log"; exit 1; fi
tail -n 3 "$W/setup.log"
ls "$REPO"/.whl/py_spy-*.whl > /dev/null 2>&1 && "$PY" -m pip install -q --no-deps py-spy 2>&1 | tail -n 1
cat "$W"/wheelhouse/*/llama-server-*/BUILD-INFO

MODEL=$W/qwen2.5-1.5b.gguf
stamp "synthetic model"
[ -f "$MODEL" ] || "$PY" -m kv3d_core.cli synth-model --shape qwen2.5-1.5b --out "$MODEL" | tail -1

if [ "${KV3D_GPU_SKIP_SERVE:-0}" != 1 ]; then
stamp "README serve on the GPU"
(scripts/serve.sh model.path="$MODEL" server.port=8090 > "$W/serve.log" 2>&1 &)
for _ in $(seq 120); do curl -sf localhost:8090/health > /dev/null && break; sleep 1; done
curl -s localhost:8090/health; echo
curl -s localhost:8090/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"qwen2.5-1.5b","prompt":[100,200,300,400],"max_tokens":4,"temperature":0}' | head -c 400; echo
grep -m1 -E "kv3d serving" "$W/serve.log"
"$KV3D_VENV/bin/kv3d" doctor model.path="$MODEL" 2>&1 | grep -E "^(llama-cpp-python|gpu|llama-server|hot KV)" -A1
pkill -f "server.port=8090"; sleep 2
fi

SIDE=(prompts=token_ids model.path="$MODEL" requests=384 turns=0.3334 followups_last=true families=1
      shared_ratio=0.8 system_prompt_tokens=1024 unique_tokens=128 max_tokens=64 temperature=0 max_turns=2
      cache.stream_ctx=2048 cache.ram_warm_mb=16384 cache.hot_sessions=0 cache.free_streams=2
      +codec=int8 quality=false progress=false request_timeout_s=900)
run_bench() {   # name, clients, extra overrides...
  local name=$1 c=$2; shift 2
  stamp "bench $name c=$c"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 200 \
      > "$W/results/gpu-$name-c$c.csv" 2>&1 &
  local smi=$!
  "$KV3D_VENV/bin/kv3d" bench "${SIDE[@]}" rounds="${ROUNDS:-2}" concurrency="$c" scheduler.max_running="$c" \
      scheduler.n_seq_max=$((c + 8)) "$@" ${KV3D_GPU_SET:-} hydra.run.dir="$W/results/$name-c$c" > "$W/results/$name-c$c.log" 2>&1
  kill $smi 2>/dev/null
  tail -n 2 "$W/results/$name-c$c.log" | cut -c1-300
  "$PY" - "$W/results/$name-c$c/report.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
for s in r["systems"]:
    f = lambda k: ("%.0f" % (s[k] * 1000)) if s.get(k) is not None else "-"
    print(f"  {s['name']:22s} {s['tokens_per_s'] or 0:8.0f} tok/s  TTFT p50 shared {f('ttft_p50_shared_s')} own "
          f"{f('ttft_p50_own_s')} resume {f('ttft_p50_resume_s')} p95 turn1 {f('ttft_p95_turn1_s')} ms  "
          f"sess/GiB {s.get('sessions_per_gb') or 0:.1f}  errors {s['errors']}")
    sched = (s.get("server_stats") or {}).get("scheduler") or {}
    if sched.get("steps"):
        mb = sched.get("microbatches") or {}
        print(f"  {'':22s} steps {sched['steps']}  passes/step {mb.get('passes', 0) / sched['steps']:.2f}  "
              f"prompt tokens put off {mb.get('trimmed_tokens', 0)}  ttft_split {sched.get('ttft_split')}")
        split = sched.get("step_seconds") or {}
        print(f"  {'':22s} step seconds {({k: round(v, 2) for k, v in split.items()})}  "
              f"longest admission {sched.get('admit_max_s', 0) * 1000:.0f} ms")
print("  ratios vs", r.get("baseline"), {k: round(v, 3) if v else v for k, v in r["ratios"].items()})
EOF
}

for stage in ${KV3D_GPU_STAGES:-side unified seed decode}; do
  case $stage in
    side)    for c in 32 64; do run_bench side "$c" "systems=[kv3d,llama_server,llama_server_unified]"; done ;;
    side2)   for c in ${KV3D_GPU_CLIENTS:-32 64}; do run_bench side "$c" "systems=[kv3d,llama_server]"; done ;;
    side64)  run_bench side 64 "systems=[kv3d,llama_server]" ;;
    side32)  run_bench side 32 "systems=[kv3d,llama_server]" ;;
    ab)      i=0; IFS=';' read -ra variants <<< "${KV3D_GPU_AB:-}"
             for v in "${variants[@]}"; do
               i=$((i + 1))
               for c in ${KV3D_GPU_CLIENTS:-32 64}; do
                 echo "  variant $i: $v"
                 # shellcheck disable=SC2086  # the overrides are words
                 ROUNDS=${KV3D_GPU_AB_ROUNDS:-1} run_bench "ab$i" "$c" "systems=[kv3d]" $v
               done
             done ;;
    stepmix) stamp "step mix"
             "$PY" benchmarks/step_mix.py --model "$MODEL" --n-gpu-layers -1 --seqs 32,64 --context 1152 \
                 --out "$W/results/stepmix.json" > "$W/results/stepmix.log" 2>&1
             grep "ms/step" "$W/results/stepmix.log" || tail -n 20 "$W/results/stepmix.log" ;;
    unified) for c in 32 64; do run_bench unified "$c" "systems=[kv3d]" cache.layout=unified cache.gpu_hot_mb=4096; done ;;
    decode)  stamp "decode overhead"
             "$PY" benchmarks/decode_overhead.py --model "$MODEL" --n-gpu-layers -1 --seqs 32,64 --gen 512 \
                 --stream-ctx 1024 --out "$W/results/decode.json" > "$W/results/decode.log" 2>&1
             grep -E "sequences:" "$W/results/decode.log" || tail -n 20 "$W/results/decode.log" ;;
    decodeprof) stamp "decode overhead, kv3d's server under py-spy"
             rm -f "$W/decode-mark"
             "$PY" benchmarks/decode_overhead.py --model "$MODEL" --n-gpu-layers -1 --seqs 64 --gen 1536 \
                 --stream-ctx 2048 --mark "$W/decode-mark" --out "$W/results/decodeprof.json" \
                 > "$W/results/decodeprof.log" 2>&1 &
             bench=$!
             for _ in $(seq 1500); do [ -s "$W/decode-mark" ] && break; sleep 0.2; done
             if [ -s "$W/decode-mark" ] && command -v py-spy > /dev/null; then
               pid=$(cat "$W/decode-mark"); sleep 1
               py-spy record --pid "$pid" --idle --threads --nonblocking -r 200 -d 6 -f raw \
                   -o "$W/results/pyspy-decode-all.txt" > "$W/results/pyspy-decode.log" 2>&1 &
               py-spy record --pid "$pid" --gil --threads --nonblocking -r 200 -d 6 -f raw \
                   -o "$W/results/pyspy-decode-gil.txt" >> "$W/results/pyspy-decode.log" 2>&1 &
             fi
             wait $bench; sleep 1
             grep -E "sequences:" "$W/results/decodeprof.log" || tail -n 20 "$W/results/decodeprof.log"
             "$PY" benchmarks/pyspy_summary.py --gil --seconds 6 "$W/results/pyspy-decode-gil.txt" 2>&1 | tail -n 12
             "$PY" benchmarks/pyspy_summary.py "$W/results/pyspy-decode-all.txt" 2>&1 | tail -n 12 ;;
    profile) stamp "profile kv3d"
             nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 \
                 > "$W/results/gpu-util-kv3d.csv" 2>&1 &
             smi=$!
             "$KV3D_VENV/bin/kv3d" bench "${SIDE[@]}" rounds=1 concurrency=32 scheduler.max_running=32 \
                 scheduler.n_seq_max=40 "systems=[kv3d]" hydra.run.dir="$W/results/profile-kv3d" \
                 > "$W/results/profile-kv3d.log" 2>&1 &
             bench=$!
             if command -v py-spy > /dev/null; then
               for _ in $(seq 300); do pid=$(pgrep -f "kv3d_core.cli serve" | head -n 1); [ -n "$pid" ] && break; sleep 0.2; done
               py-spy record --pid "$pid" --idle --threads --nonblocking -r 200 -f raw \
                   -o "$W/results/pyspy-kv3d.txt" > "$W/results/pyspy.log" 2>&1 &
             fi
             wait $bench; kill $smi 2>/dev/null; sleep 1
             tail -n 2 "$W/results/profile-kv3d.log" | cut -c1-300 ;;
    seed)    stamp "seed workload"
             "$KV3D_VENV/bin/kv3d" bench model.path="$MODEL" requests=100 +codec=int8 quality=false progress=false \
                 "systems=[kv3d,llama_server]" cache.ram_warm_mb=16384 hydra.run.dir="$W/results/seed" \
                 > "$W/results/seed.log" 2>&1; tail -n 3 "$W/results/seed.log" ;;
  esac
done
stamp "done"
