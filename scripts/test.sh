#!/usr/bin/env bash
# Install kv3d with its test dependencies (first run only) and run the test suite.
# Arguments are passed to pytest:  scripts/test.sh -k prefix -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec "${KV3D_VENV:-.venv}/bin/python" -m pytest "$@"
