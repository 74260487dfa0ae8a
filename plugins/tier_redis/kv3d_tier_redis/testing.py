"""Real stores for tests, on loopback only, each in its own temp directory, stopped by pid:

- :class:`RedisServer`: one ``redis-server`` on a free port, no persistence; optionally
  TLS only (``--port 0 --tls-port``, certificates from :func:`make_certs`, client
  certificates required or not);
- :class:`RedisClusterServers`: a real Redis Cluster of three masters (three
  ``redis-server --cluster-enabled yes`` made one cluster by ``redis-cli --cluster create``),
  plain or TLS (``--tls-cluster yes``: clients and the cluster bus).

``scripts/test.sh`` installs Debian's ``redis-server`` and ``redis-tools`` (``redis-cli``)
when missing. :func:`tls_missing` and :func:`cli_missing` say why a test must skip (a
``redis-server`` built without TLS, no ``redis-cli``); nothing else is a reason to."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not on PATH: scripts/test.sh installs it "
                           "(apt-get install redis-server)")
    return exe


def tls_missing() -> str | None:
    """Why ``redis-server`` here cannot serve TLS (a build without OpenSSL), or None. A TLS
    build links OpenSSL (Debian's: ``libssl.so``) or carries its version string."""
    exe = _server_exe()
    try:
        linked = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        linked = ""
    if "libssl" in linked:
        return None
    with open(exe, "rb") as f:
        if b"OpenSSL" in f.read():
            return None
    return f"{exe} is built without TLS (BUILD_TLS=no): no OpenSSL in it"


def cli_missing() -> str | None:
    """Why there is no ``redis-cli`` (to create a cluster), or None."""
    if shutil.which("redis-cli") is None:
        return "redis-cli is not on PATH (Debian package redis-tools; scripts/test.sh installs it)"
    return None


# -- certificates ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    """A test CA and what it signed (PEM files): a server certificate for 127.0.0.1 and
    localhost, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl is not on PATH (Debian package openssl)")
    out = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {out.stderr[-2000:]}")


def make_certs(tmp: Path, name: str = "ca") -> Certs:
    """A fresh CA (``name``) in ``tmp`` and certificates it signs, valid two days, EC P-256,
    with the extensions a strict verifier wants (basic constraints, key usage, key ids)."""
    d = Path(tmp) / name
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN=kv3d test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash", cwd=d)
    # the server's certificate is also the client certificate of a cluster node on the cluster bus
    for who, usage, alt in (("server", "serverAuth,clientAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
                            ("client", "clientAuth", "")):
        (d / f"{who}.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                      "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                      f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
                                      "authorityKeyIdentifier=keyid\n" + alt)
        _openssl("req", *key, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=kv3d test {who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


# -- one server ----------------------------------------------------------------------------------------------
class _PortTaken(RuntimeError):
    """redis-server could not listen: another process holds one of its ports."""


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port``; :meth:`stop` and :meth:`start` again keep
    the port (the store comes back empty: it saves nothing). With ``tls`` it listens for
    TLS only on that port (``--port 0``); ``tls_auth_clients``: it requires a client
    certificate signed by the CA. ``cluster_port``: it also listens on a cluster bus port of
    its own (a cluster node). Ports it picked itself are picked again when another process
    took one between the pick and the first start (``Address already in use``)."""

    def __init__(self, tmp: Path, *, port: int | None = None, password: str | None = None,
                 extra: list[str] = (), tls: Certs | None = None, tls_auth_clients: bool = False,
                 cluster_port: bool = False) -> None:
        self.exe = _server_exe()
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._picked = port is None
        self.port = port or free_port()
        self.cluster_port = free_port() if cluster_port else None
        self._started = False
        self.password = password
        self.extra = list(extra)
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def settings(self) -> dict[str, Any]:
        """The tier's connection settings (``RedisTier(**settings, prefix=...)``) for this server."""
        return {"url": self.url, **_tls_settings(self.tls, self.tls_auth_clients)}

    def args(self) -> list[str]:
        args = [self.exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp), "--logfile", str(self.tmp / "redis.log")]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "yes" if self.tls_auth_clients else "no"]
        else:
            args += ["--port", str(self.port)]
        if self.cluster_port is not None:
            args += ["--cluster-port", str(self.cluster_port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra

    def start(self, timeout: float = 20.0) -> "RedisServer":
        for attempt in range(5):
            try:
                return self._start(timeout)
            except _PortTaken:
                if self._started or not (self._picked or self.cluster_port is not None) or attempt == 4:
                    raise
                if self._picked:
                    self.port = free_port()
                if self.cluster_port is not None:
                    self.cluster_port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "RedisServer":
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running (pid {self.proc.pid})")
        log = self.tmp / "redis.log"
        at = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = log.read_bytes()[at:].decode(errors="replace") if log.exists() else ""
                if "Address already in use" in said:
                    self.proc = None
                    raise _PortTaken(said)
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        self._started = True
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s: {self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if not self.tls:
            return s
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        if self.tls_auth_clients:
            ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx.wrap_socket(s, server_hostname="127.0.0.1")

    def cli(self, *args: str, timeout: float = 30) -> str:
        """``redis-cli`` against this server (TLS and password as it needs); its output."""
        return _cli(self.port, self.tls, self.tls_auth_clients, self.password, list(args), timeout)

    def log(self) -> str:
        try:
            return (self.tmp / "redis.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server (by its pid) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def _tls_settings(tls: Certs | None, client_cert: bool) -> dict[str, Any]:
    if tls is None:
        return {}
    out: dict[str, Any] = {"tls": True, "tls_ca_file": str(tls.ca)}
    if client_cert:
        out.update(tls_cert_file=str(tls.client_cert), tls_key_file=str(tls.client_key))
    return out


def _cli(port: int, tls: Certs | None, client_cert: bool, password: str | None, args: list[str],
         timeout: float) -> str:
    exe = shutil.which("redis-cli")
    if exe is None:
        raise RuntimeError(cli_missing())
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port)]
    if tls:
        cmd += ["--tls", "--cacert", str(tls.ca)]
        if client_cert:
            cmd += ["--cert", str(tls.client_cert), "--key", str(tls.client_key)]
    env = dict(os.environ)
    if password:
        env["REDISCLI_AUTH"] = password        # not on the command line
    out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args[:2])} failed ({out.returncode}): {out.stdout[-1500:]}"
                           f"{out.stderr[-1500:]}")
    return out.stdout


# -- a cluster --------------------------------------------------------------------------------------------------
class RedisClusterServers:
    """A Redis Cluster of ``n`` masters (no replicas) on loopback: each a :class:`RedisServer`
    with ``--cluster-enabled yes``, its node file and cluster bus port of its own, joined by
    ``redis-cli --cluster create`` (the 16384 slots split evenly). :meth:`start` returns once
    every node reports ``cluster_state:ok`` and knows every node. A node stopped and started
    again keeps its slots (its node file), not its keys."""

    def __init__(self, tmp: Path, *, n: int = 3, password: str | None = None, tls: Certs | None = None,
                 tls_auth_clients: bool = False, node_timeout_ms: int = 2000) -> None:
        self.tmp = Path(tmp)
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.password = password
        self.nodes: list[RedisServer] = []
        for i in range(n):
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", str(node_timeout_ms)]
            if password:
                extra += ["--masterauth", password]
            if tls:
                extra += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            self.nodes.append(RedisServer(self.tmp / f"node{i}", password=password, extra=extra, tls=tls,
                                          tls_auth_clients=tls_auth_clients, cluster_port=True))

    @property
    def url(self) -> str:
        """The first node's url: a cluster client learns the others from it."""
        return self.nodes[0].url

    @property
    def settings(self) -> dict[str, Any]:
        return {"url": self.url, "cluster": True, **_tls_settings(self.tls, self.tls_auth_clients)}

    def start(self, timeout: float = 60.0) -> "RedisClusterServers":
        try:
            for node in self.nodes:
                if not node.running:          # nodes stopped and started again one by one stay up
                    node.start()
            if not self._formed():
                self.nodes[0].cli("--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                                  "--cluster-replicas", "0", "--cluster-yes", timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _formed(self) -> bool:
        """Every node already has its slots (node files from an earlier start)."""
        return all("cluster_slots_assigned:16384" in n.cli("cluster", "info") for n in self.nodes)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node says ``cluster_state:ok`` and knows all ``n`` nodes."""
        deadline = time.monotonic() + timeout
        info = ""
        while time.monotonic() < deadline:
            infos = [n.cli("cluster", "info") for n in self.nodes]
            want = f"cluster_known_nodes:{len(self.nodes)}"
            if all("cluster_state:ok" in i and want in i for i in infos):
                return
            info = infos[0]
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not reach cluster_state:ok in {timeout}s: {info}")

    def keyslot(self, key: str) -> int:
        return int(self.nodes[0].cli("cluster", "keyslot", key).strip())

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
