#!/usr/bin/env bash
# Route to N kv3d replicas through HAProxy (deploy/router/haproxy.cfg; docs/SCALING.md).
#
#   deploy/router/run-haproxy.sh [--bind ADDR:PORT] REPLICA [REPLICA ...]
#   deploy/router/run-haproxy.sh --bind 0.0.0.0:8080 10.0.0.11:8081 10.0.0.12:8081
#
# REPLICA is host:port of a `kv3d serve`. Runs HAProxy in the foreground (master-worker, logs
# to stdout) until it gets SIGTERM or SIGINT. HAPROXY=/path/to/haproxy picks the binary
# (default: haproxy on PATH; Debian: apt-get install haproxy).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bind=${KV3D_ROUTER_BIND:-0.0.0.0:8080}
if [ "${1:-}" = "--bind" ]; then bind=$2; shift 2; fi
if [ $# -lt 1 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
haproxy=${HAPROXY:-$(command -v haproxy || true)}
[ -n "$haproxy" ] || { echo "haproxy not found: apt-get install haproxy" >&2; exit 127; }
cfg=$(mktemp -d)/haproxy.cfg
trap 'rm -rf "$(dirname "$cfg")"' EXIT
cp "$here/haproxy.cfg" "$cfg"
n=0
for replica in "$@"; do
    n=$((n + 1))
    echo "    server r$n $replica" >> "$cfg"
done
export KV3D_ROUTER_BIND=$bind
"$haproxy" -c -q -f "$cfg"
# not exec: the trap removes the generated file when HAProxy ends; signals are passed on
"$haproxy" -W -db -f "$cfg" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
wait $pid || true
wait $pid 2>/dev/null || true
