#!/usr/bin/env bash
# Install kv3d (first run only) and start `kv3d serve` on the default model.
# Arguments are passed to `kv3d serve`:  scripts/serve.sh codec=int8 tier=ssd server.port=9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${KV3D_VENV:-.venv}/bin/kv3d" serve "$@"
