"""Cache-aware routing on a real HAProxy (deploy/router/, docs/SCALING.md): two real
``kv3d serve`` replicas behind ``deploy/router/run-haproxy.sh`` on loopback. The turns of a
conversation and the sessions of a prefix family land on the replica that holds their KV
(seen on each replica's own /metrics, and as cached prompt tokens), while different
families and sessions spread over both; a replica that goes away is routed around.

Skipped only when the ``haproxy`` binary is missing (scripts/test.sh installs Debian's)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import MODEL_ID, REPO, Server, free_port

HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/test.sh installs "
                                                        "Debian's: apt-get install haproxy)")

CHAT_OK = 'kv3d_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
HEALTH_OK = 'kv3d_http_requests_total{endpoint="/health",status="200"}'
TOPICS = ["lighthouses", "violins", "glaciers", "beekeeping", "trams", "origami"]


def family_prompt(topic: str) -> str:
    return (f"You are a museum guide who only talks about {topic}. You answer visitors' questions about "
            f"{topic} in two short sentences, with one surprising fact about {topic} each time, and you "
            f"never talk about anything else.")


class Cluster:
    def __init__(self, replicas: list[Server], url: str, proc: subprocess.Popen, log) -> None:
        self.replicas, self.url, self.proc, self.log = replicas, url, proc, log

    def counts(self) -> list[float]:
        return [r.metrics().get(CHAT_OK, 0.0) for r in self.replicas]

    def served_by(self, send):
        """``send()``'s result and the index of the one replica that answered it (requests are
        sent one at a time, so the replica whose counter moved is the one)."""
        before = self.counts()
        out = send()
        moved = [i for i, (a, b) in enumerate(zip(before, self.counts())) if b > a]
        assert len(moved) == 1 and self.counts()[moved[0]] == before[moved[0]] + 1, (before, moved)
        return out, moved[0]

    def router_log(self) -> str:
        self.log.flush()
        return open(self.log.name, errors="replace").read()[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    # one llama.cpp thread each: two replicas' spinning thread pairs on 2 cores slow every request
    replicas = [Server([f"cache.ssd_cold_path={tmp / f'cold{i}'}", "server.threads=1"], tmp / f"replica{i}.log")
                for i in range(2)]
    with ThreadPoolExecutor(2) as pool:            # start both at once (each takes a while)
        list(pool.map(lambda s: s.start(), replicas))
    port = free_port()
    log = open(tmp / "haproxy.log", "w+b")
    proc = subprocess.Popen([str(REPO / "deploy/router/run-haproxy.sh"), "--bind", f"127.0.0.1:{port}",
                             *[r.url.removeprefix("http://") for r in replicas]],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(replicas, f"http://127.0.0.1:{port}", proc, log)
    try:
        probes = [r.metrics().get(HEALTH_OK, 0.0) for r in replicas]
        deadline = time.monotonic() + 30
        while True:                                 # up, and its health checks reach both replicas
            assert proc.poll() is None, f"the router exited:\n{c.router_log()}"
            try:
                up = httpx.get(c.url + "/router/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and all(r.metrics().get(HEALTH_OK, 0.0) > p for r, p in zip(replicas, probes)):
                break
            assert time.monotonic() < deadline, f"HAProxy did not probe both replicas' /health:\n{c.router_log()}"
            time.sleep(0.3)
        yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        for r in replicas:
            r.stop()


def chat(url: str, messages: list[dict], headers: dict | None = None) -> dict:
    r = httpx.post(url + "/v1/chat/completions", headers=headers or {}, timeout=180,
                   json={"model": MODEL_ID, "messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def cached(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_family_and_its_conversations_stay_on_one_replica_without_client_changes(cluster):
    """No routing header: the first message (the family's system prompt) is the key."""
    home: dict[str, set[int]] = {}
    for topic in TOPICS[:4]:
        system = {"role": "system", "content": family_prompt(topic)}
        for k, question in enumerate(["What should I look at first?", "Who made the oldest one?"]):
            first = [system, {"role": "user", "content": question}]
            r1, a = cluster.served_by(lambda: chat(cluster.url, first))
            if k == 1:                      # the family's second session: its system prompt is cached there
                assert cached(r1) >= 30, r1["usage"]
            second = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                              {"role": "user", "content": "Tell me more."}]
            r2, b = cluster.served_by(lambda: chat(cluster.url, second))
            assert b == a, f"turn 2 of a {topic} conversation went to replica {b}, turn 1 to {a}"
            assert cached(r2) >= r1["usage"]["prompt_tokens"] - 1, (r1["usage"], r2["usage"])
            home.setdefault(topic, set()).add(a)
    assert all(len(v) == 1 for v in home.values()), f"a family's sessions were split: {home}"
    assert set().union(*home.values()) == {0, 1}, f"every family went to one replica: {home}"


def test_the_session_header_keeps_each_conversation_on_its_replica(cluster):
    """X-Session-Id, sent by the official client (default_headers), overrides the first message:
    one family's conversations spread over both replicas, each staying on its own."""
    system = {"role": "system", "content": family_prompt(TOPICS[4])}
    homes = []
    for n in range(6):
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=180,
                               default_headers={"X-Session-Id": f"conversation-{n}"})
        first = [system, {"role": "user", "content": f"Question number {n}: how are they made?"}]
        r1, a = cluster.served_by(lambda: client.chat.completions.create(
            model=MODEL_ID, messages=first, max_tokens=4, temperature=0))
        second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                          {"role": "user", "content": "And how long does that take?"}]

        def streamed():                      # the second turn streams (Server-Sent Events through HAProxy)
            chunks = list(client.chat.completions.create(model=MODEL_ID, messages=second, max_tokens=4,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            return chunks[-1].usage
        usage, b = cluster.served_by(streamed)
        assert b == a, f"conversation-{n}: turn 2 on replica {b}, turn 1 on {a}"
        assert usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1
        homes.append(a)
    assert set(homes) == {0, 1}, f"six session keys all hashed to one replica: {homes}"


def test_requests_for_a_stopped_replica_go_to_the_other(cluster):
    """Last in this module: it kills a replica (SIGKILL, as a crash). Its keys move to the one
    left (a refused connection is retried there at once; the health check then marks it down)."""
    keys = {}
    for n in range(6):
        _, i = cluster.served_by(lambda: chat(cluster.url, [{"role": "user", "content": "Hi"}],
                                              {"X-Session-Id": f"key-{n}"}))
        keys[f"key-{n}"] = i
    assert set(keys.values()) == {0, 1}, keys
    gone = 1
    cluster.replicas[gone].stop(signal.SIGKILL)
    left = cluster.replicas[1 - gone]
    for key, i in keys.items():
        before = left.metrics().get(CHAT_OK, 0.0)
        chat(cluster.url, [{"role": "user", "content": "Hi"}], {"X-Session-Id": key})
        assert left.metrics().get(CHAT_OK, 0.0) == before + 1, f"{key} (was on replica {i}) not served by the other"

