#!/usr/bin/env bash
# Install kv3d with its test dependencies (first run only) and run the test suite.
# Arguments are passed to pytest:  scripts/test.sh -k prefix -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# tests/test_dashboard.py drives a real headless browser: Debian's chromium and its driver
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        chromium chromium-driver
fi
# the redis tier's tests (plugins/tier_redis, tests/test_tier_redis.py) run a real store: Debian's redis-server
# (built with TLS), redis-cli (redis-tools) to form a real cluster, openssl for the test certificates
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v openssl >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        redis-server redis-tools openssl
fi
# tests/test_router.py routes between two replicas through a real HAProxy (deploy/router/): Debian's haproxy
if ! command -v haproxy >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        haproxy
fi
exec "${KV3D_VENV:-.venv}/bin/python" -m pytest "$@"
