"""The test helpers' own behaviour (``kv3d_tier_redis.testing``)."""

from __future__ import annotations

import socket

import pytest

from kv3d_tier_redis.testing import RedisServer, cli_missing


def test_a_server_picks_its_ports_again_when_another_process_took_one(tmp_path):
    """A cluster node whose bus port another process took between the pick and the start
    (seen once in CI: ``Address already in use``) starts on new ports instead of failing."""
    if cli_missing():
        pytest.skip(cli_missing())
    srv = RedisServer(tmp_path, cluster_port=True,
                      extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", srv.cluster_port))
        blocker.listen()
        taken = srv.cluster_port
        try:
            srv.start()
            assert srv.running and srv.cluster_port != taken
            assert "PONG" in srv.cli("ping")
        finally:
            srv.stop()
