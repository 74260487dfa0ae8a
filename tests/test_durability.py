"""Durability and the cold tier's failure policy, end to end: a real `kv3d serve`
over HTTP, real files, faults made with real filesystem operations.

- kill -9 while sessions spill, then a restart: every session file that was on
  disk comes back and resumes (its cached tokens cover the first turn);
- damaged entry files (truncated, a flipped byte, a symlink, a damaged family
  snapshot): each is a counted miss, the other sessions still restore, the tier
  stays on;
- a directory that stops taking writes (a file where it should be, read-only,
  deleted, a full disk): /health says degraded with the reason, the failed writes
  are counted, and the tier comes back by itself once the directory is usable,
  without a restart.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL_ID, running_server
from kv3d_tier_ssd import fileformat as ff

SYSTEM = ("You are the archivist of a harbour museum. You answer questions about ships, sailors, "
          "lighthouses and storms of the last two centuries, in two short sentences at most.")

# 256 cells and 4 sequences: the family snapshot and two idle sessions stay hot, more spill.
# One llama.cpp thread: on a machine shared with other work, two threads spinning at llama.cpp's
# barriers get descheduled and a request can take 40 times longer; these tests time nothing.
SMALL_HOT = ["cache.gpu_hot_mb=8", "scheduler.n_seq_max=4", "scheduler.max_running=2", "server.threads=1"]
FAST_RETRY = ["safety.tier_retry_s=0.2", "safety.tier_retry_max_s=1"]


def ssd(cold: Path, *more: str) -> list[str]:
    return SMALL_HOT + ["+tier=ssd", f"cache.ssd_cold_path={cold}", "+codec=int8", *more]


def first_turn(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Visitor {i}: which ship is in display case {i}?"}]


def second_turn(i: int, reply: str) -> list[dict]:
    return first_turn(i) + [{"role": "assistant", "content": reply},
                            {"role": "user", "content": "And who was her captain?"}]


def chat(url: str, messages: list[dict], **kw) -> dict:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def reply_of(r: dict) -> str:
    return r["choices"][0]["message"]["content"]


def cached(r: dict) -> int:
    return r["usage"]["prompt_tokens_details"]["cached_tokens"]


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def metric(srv, name: str) -> float:
    return srv.metrics().get(name, 0.0)


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def entry_files(cold: Path) -> dict[str, list[Path]]:
    """The complete entry files by kind (read with the plugin's own header parser)."""
    out: dict[str, list[Path]] = {"snapshot": [], "session": []}
    for p in sorted(cold.glob("*.kv3d")):
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            out[ff.read_header(fd, os.fstat(fd).st_size).meta.kind].append(p)
        finally:
            os.close(fd)
    return out


def reference(url: str, messages: list[dict]) -> str:
    """The same request recomputed from scratch: another cache_salt is another namespace."""
    return reply_of(chat(url, messages, cache_salt=f"reference-{time.monotonic_ns()}"))


def same_start(a: str, b: str) -> bool:
    # Restored cells sit elsewhere in llama.cpp's unified cache, which can change the order of
    # attention's float sums: the first word must agree, later ones may drift (as in test_tiers).
    return a.split()[:1] == b.split()[:1]


# -- kill -9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warm_mb", [1024, 0], ids=["warm+cold", "cold-only"])
def test_kill9_during_spills_loses_no_written_session(tmp_path, warm_mb):
    """Sessions spill while requests run; the server is killed with SIGKILL in the middle.
    After a restart every session file that was complete on disk is re-indexed (none
    deleted for a missing family snapshot: it was written before the first delta) and
    its conversation resumes with the first turn cached."""
    cold = tmp_path / "cold"
    overrides = ssd(cold, f"cache.ram_warm_mb={warm_mb}")
    with running_server(tmp_path, overrides) as srv:
        firsts = {i: chat(srv.url, first_turn(i)) for i in range(6)}       # the early ones spill
        base = metric(srv, 'kv3d_spills_total{tier="cold"}')
        assert base >= 3, "sessions were written to the cold tier"
        pool = concurrent.futures.ThreadPoolExecutor(4)
        running = {i: pool.submit(chat, srv.url, first_turn(i)) for i in range(6, 14)}
        wait_for(lambda: metric(srv, 'kv3d_spills_total{tier="cold"}') > base + 1, 120, "spills under load")
        srv.proc.send_signal(signal.SIGKILL)                              # mid-flight
        srv.proc.wait(30)
        for i, fut in running.items():
            with contextlib.suppress(Exception):
                firsts[i] = fut.result(timeout=60)
        pool.shutdown()
    files = entry_files(cold)
    in_flight = sorted(p.name for p in cold.iterdir() if ff.is_temp(p.name))
    assert len(files["snapshot"]) == 1, "the family snapshot was persisted (once, not once per session)"
    n_sessions = len(files["session"])
    assert n_sessions >= 3, files

    with running_server(tmp_path, overrides) as srv:
        m = srv.metrics()
        assert m.get('kv3d_tier_reindexed_total{kind="session",tier="cold"}', 0) == n_sessions
        assert m.get('kv3d_tier_reindexed_total{kind="snapshot",tier="cold"}', 0) == 1
        assert m.get('kv3d_tier_reindexed_total{kind="orphan",tier="cold"}', 0) == 0
        assert not [k for k in m if k.startswith("kv3d_tier_entries_dropped_total{")]
        resumed, outputs = 0, []
        for i, first in sorted(firsts.items()):
            second = chat(srv.url, second_turn(i, reply_of(first)))
            resumed += cached(second) >= first["usage"]["prompt_tokens"]
            outputs.append((i, reply_of(second)))
        m = srv.metrics()
        for i, text in outputs[:3]:                                          # right answers, not just hits
            assert same_start(text, reference(srv.url, second_turn(i, reply_of(firsts[i])))), (i, text)
        assert health(srv.url)["status"] == "ok"
    print(f"\n[{warm_mb} MB warm] killed with {n_sessions} session files on disk, {len(in_flight)} writes in "
          f"flight; after the restart {resumed}/{len(firsts)} conversations resumed from the cold tier")
    assert resumed >= n_sessions, "a session file on disk did not resume"
    assert m.get('kv3d_restores_total{tier="cold"}', 0) >= n_sessions


# -- damaged entries: per entry, never the whole tier ------------------------------------------------------
def _conversations(tmp_path: Path, cold: Path, n: int) -> dict[int, dict]:
    """n first turns, then a graceful stop: every session is in the cold tier."""
    with running_server(tmp_path, ssd(cold)) as srv:
        return {i: chat(srv.url, first_turn(i)) for i in range(n)}


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip_payload_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) * 3 // 4] ^= 0x40
    p.write_bytes(bytes(data))


def _symlink_to_passwd(p: Path) -> None:
    p.unlink()
    p.symlink_to("/etc/passwd")


def test_damaged_session_files_are_per_entry_misses(tmp_path):
    cold = tmp_path / "cold"
    firsts = _conversations(tmp_path, cold, 7)
    sessions = entry_files(cold)["session"]
    assert len(sessions) == 7
    for p, damage in zip(sessions, (_truncate, _flip_payload_byte, _symlink_to_passwd, _flip_payload_byte)):
        damage(p)                                                            # 4 of 7 damaged, in 3 ways
    with running_server(tmp_path, ssd(cold)) as srv:
        results = {i: chat(srv.url, second_turn(i, reply_of(f))) for i, f in firsts.items()}
        m = srv.metrics()
        resumed = [i for i, r in results.items() if cached(r) >= firsts[i]["usage"]["prompt_tokens"]]
        for i, r in results.items():                                         # hit or miss, the right answer
            assert same_start(reply_of(r), reference(srv.url, second_turn(i, reply_of(firsts[i])))), i
        h = health(srv.url)
        m_after = srv.metrics()
    assert len(resumed) == 3, "the three intact sessions restored, the damaged ones were recomputed"
    assert m.get('kv3d_tier_errors_total{reason="truncated",tier="cold"}', 0) == 1
    assert m.get('kv3d_tier_errors_total{reason="symlink",tier="cold"}', 0) == 1
    assert m.get('kv3d_tier_errors_total{reason="checksum",tier="cold"}', 0) == 2
    assert m.get('kv3d_restores_total{tier="cold"}', 0) >= 3
    assert h["status"] == "ok", h                                            # the tier stayed on
    assert m_after.get('kv3d_tier_up{tier="cold"}') == 1 and m_after.get("kv3d_safe_mode") == 0
    assert Path("/etc/passwd").stat().st_size > 0


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte], ids=["found at start-up", "found on read"])
def test_damaged_family_snapshot_orphans_its_sessions_until_recomputed(tmp_path, damage):
    """The snapshot every session needs is damaged: the sessions are kept, not deleted;
    the first request recomputes the family prefix and the others then resume from
    their stored deltas."""
    cold = tmp_path / "cold"
    firsts = _conversations(tmp_path, cold, 5)
    files = entry_files(cold)
    assert len(files["snapshot"]) == 1 and len(files["session"]) == 5
    damage(files["snapshot"][0])
    with running_server(tmp_path, ssd(cold)) as srv:
        results = {i: chat(srv.url, second_turn(i, reply_of(f))) for i, f in firsts.items()}
        m = srv.metrics()
        on_disk = entry_files(cold)
        for i in (1, 4):
            assert same_start(reply_of(results[i]), reference(srv.url, second_turn(i, reply_of(firsts[i])))), i
        assert health(srv.url)["status"] == "ok"
    resumed = [i for i, r in results.items() if cached(r) >= firsts[i]["usage"]["prompt_tokens"]]
    assert cached(results[0]) < firsts[0]["usage"]["prompt_tokens"], "the first request recomputed the prefix"
    assert resumed == [1, 2, 3, 4], "the other sessions resumed from their deltas"
    assert m.get("kv3d_tier_orphans_adopted_total", 0) >= 4
    assert m.get("kv3d_tier_orphans", 0) == 0
    assert sum(v for k, v in m.items() if k.startswith("kv3d_tier_errors_total{")) == 1
    assert len(on_disk["snapshot"]) == 1, "the recomputed snapshot was persisted again"


# -- systemic faults: down, reported, back by itself -------------------------------------------------------
def _fill_hot(url: str, start: int, n: int = 5) -> None:
    """Enough new conversations that earlier ones spill (each spill writes to the cold tier)."""
    for i in range(start, start + n):
        chat(url, first_turn(i))


def _degraded(url: str) -> dict | None:
    h = health(url)
    return h if h["status"] == "degraded" else None


def _recovers(srv, cold: Path, start: int, faults: str) -> float:
    """After the fix: /health ok again without a restart, and spills reach the directory.
    Returns the seconds from the fix to /health ok."""
    t0 = time.monotonic()
    wait_for(lambda: health(srv.url)["status"] == "ok", 30, "/health ok after the fix")
    took = time.monotonic() - t0
    m = srv.metrics()
    assert m.get('kv3d_tier_up{tier="cold"}') == 1
    assert m.get('kv3d_tier_recoveries_total{tier="cold"}', 0) >= 1
    assert m.get(f'kv3d_tier_faults_total{{reason="{faults}",tier="cold"}}', 0) >= 1
    before = m.get('kv3d_spills_total{tier="cold"}', 0)
    _fill_hot(srv.url, start)
    wait_for(lambda: metric(srv, 'kv3d_spills_total{tier="cold"}') > before, 30, "a cold write after recovery")
    assert cold.is_dir() and entry_files(cold)["session"], "new entries on disk"
    return took


def _fault_window(srv, cold: Path, reason: str, expect: str) -> dict:
    """Spills while the directory cannot be written: degraded with the reason, writes counted."""
    _fill_hot(srv.url, 100)                                                 # every request still answers
    h = wait_for(lambda: (d := _degraded(srv.url)) and expect in d["reason"] and d, 30,
                 f"/health degraded with {expect!r} in the reason")
    m = srv.metrics()
    assert m.get(f'kv3d_tier_dropped_writes_total{{reason="{reason}",tier="cold"}}', 0) >= 1
    assert m.get('kv3d_tier_up{tier="cold"}') == 0 and srv.stats()["cold"]["up"] is False
    _fill_hot(srv.url, 200, 3)                                              # while down: skipped, counted
    assert metric(srv, 'kv3d_tier_dropped_writes_total{reason="tier_down",tier="cold"}') >= 1
    return h


def _rmtree(d: Path) -> None:
    """``rm -rf d`` while the server may still be writing into it: a file created during the
    walk makes the last rmdir fail (ENOTEMPTY), so go again, as an operator would."""
    deadline = time.monotonic() + 30
    while True:
        try:
            shutil.rmtree(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_file_in_place_of_the_directory(tmp_path):
    cold = tmp_path / "cold"
    with running_server(tmp_path, ssd(cold, *FAST_RETRY)) as srv:
        _fill_hot(srv.url, 0)
        assert entry_files(cold)["session"]
        for _ in range(100):                 # (the tier may re-create the directory between the two)
            _rmtree(cold)
            try:
                cold.write_text("not a directory")
                break
            except IsADirectoryError:
                continue                                   # cannot be re-created either
        h = _fault_window(srv, cold, "io_error", "not a directory")
        time.sleep(1.5)
        assert _degraded(srv.url), "stays degraded while the path is a file"
        cold.unlink()                                                        # the fix
        took = _recovers(srv, cold, 300, "io_error")
        assert (cold.stat().st_mode & 0o777) == 0o700
    print(f"\n/health while a file stood in place of the directory: {h}; ok {took:.1f} s after its removal")


def test_deleted_directory_is_recreated(tmp_path):
    cold = tmp_path / "cold"
    with running_server(tmp_path, ssd(cold, *FAST_RETRY)) as srv:
        _fill_hot(srv.url, 0)
        _rmtree(cold)                                                       # (spills may still be landing)
        _fill_hot(srv.url, 100)                                             # the next write fails ...
        wait_for(lambda: metric(srv, 'kv3d_tier_dropped_writes_total{reason="io_error",tier="cold"}') >= 1,
                 30, "a failed write counted")
        took = _recovers(srv, cold, 300, "io_error")                        # ... and the tier re-creates it
    print(f"\ndeleted directory re-created; /health ok {took:.1f} s after the failed write was counted")


def _make_read_only(d: Path) -> tuple[str, callable]:
    """Make ``d`` refuse new files for this process, by whatever really works here: chmod
    (not for root, which ignores permission bits), else the immutable attribute."""
    def blocks() -> bool:
        probe = d / "probe"
        try:
            probe.write_bytes(b"x")
        except OSError:
            return True
        probe.unlink()
        return False

    d.chmod(0o500)
    if blocks():
        return "chmod 0500", lambda: d.chmod(0o700)
    d.chmod(0o700)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        if blocks():
            return "chattr +i", lambda: subprocess.run(["chattr", "-i", str(d)], check=True)
        subprocess.run(["chattr", "-i", str(d)], check=True)
    pytest.skip("no way to make a directory read-only for this user here (chmod ignored, chattr unavailable)")


def test_read_only_directory(tmp_path):
    cold = tmp_path / "cold"
    with running_server(tmp_path, ssd(cold, *FAST_RETRY)) as srv:
        _fill_hot(srv.url, 0)
        how, undo = _make_read_only(cold)
        try:
            h = _fault_window(srv, cold, "io_error", "does not take writes")
        finally:
            undo()
        took = _recovers(srv, cold, 300, "io_error")
    print(f"\nread-only by {how}; /health meanwhile: {h}; ok {took:.1f} s after the fix")


def test_full_disk(tmp_path):
    """A small tmpfs as the cold directory (needs mount rights: root here), filled up."""
    cold = tmp_path / "cold"
    cold.mkdir(mode=0o700)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(cold)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        with running_server(tmp_path, ssd(cold, *FAST_RETRY)) as srv:
            _fill_hot(srv.url, 0)
            filler = cold / "filler"
            with open(filler, "wb") as f:                                   # take every free byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            h = _fault_window(srv, cold, "disk_full", "disk full")
            filler.unlink()
            took = _recovers(srv, cold, 300, "disk_full")
    finally:
        subprocess.run(["umount", "-l", str(cold)], check=False)
    print(f"\n/health on a full disk: {h}; ok {took:.1f} s after space was freed")


# -- the SSD tier's part, on its own (fast) ---------------------------------------------------------------
def _tier(d: Path, capacity_mb: float = 64):
    from kv3d_tier_ssd.tier import SsdTier

    dropped: list[str] = []
    t = SsdTier(path=str(d), capacity_mb=capacity_mb)
    t.bind(model_fingerprint="f" * 32, on_dropped=dropped.append)
    return t, dropped


def _entry(i: int, size: int = 100_000, kind: str = "session"):
    import hashlib

    import numpy as np
    from kv3d_core.contracts.tier import EntryMeta, TierEntry

    k = hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()
    meta = EntryMeta(key=k, kind=kind, namespace="a" * 32, family="b" * 32, tokens=np.arange(i, i + 20, dtype=np.int32),
                     n_prefix=0, codec_id="int8", codec_version=1, model_fingerprint="f" * 32, f16_bytes=0)
    return TierEntry(meta, os.urandom(size))


def test_ssd_check_recreates_a_deleted_directory(tmp_path):
    d = tmp_path / "cold"
    t, dropped = _tier(d)
    assert t.put(_entry(0)) and t.check() is None
    shutil.rmtree(d)
    assert not t.put(_entry(1)) and dropped == ["io_error"]               # the held directory is gone
    d.parent.joinpath("cold").write_text("x")                             # a file in its place
    problem = t.check()
    assert problem and "not a directory" in problem
    d.unlink()
    assert t.check() is None and d.is_dir() and (d.stat().st_mode & 0o777) == 0o700
    assert len(t) == 0 and t.used_bytes == 0, "entries of the deleted directory are forgotten"
    assert t.put(_entry(2)) and t.get(_entry(2).meta.key).payload
    assert not [p for p in d.iterdir() if ff.is_temp(p.name)], "the probe file is gone"
    t.close()


def test_ssd_check_reopens_a_replaced_directory(tmp_path):
    d = tmp_path / "cold"
    t, _ = _tier(d)
    e = _entry(0)
    assert t.put(e)
    shutil.move(d, tmp_path / "moved")
    d.mkdir(mode=0o700)
    shutil.copy(tmp_path / "moved" / ff.file_name(e.meta.key), d)          # restored from a backup
    assert t.check() is None
    assert t.contains(e.meta.key) and t.get(e.meta.key).payload == e.payload
    t.close()


def test_touch_keeps_a_snapshot_ahead_of_its_sessions(tmp_path):
    """The stack touches the family snapshot whenever a session of it is written: LRU
    eviction then takes the sessions first, also after a restart (the order is the mtimes)."""
    d = tmp_path / "cold"
    t, _ = _tier(d, capacity_mb=0.45)                                        # four entries fit
    snap = _entry(0, kind="snapshot")
    assert t.put(snap)
    for i in range(1, 4):
        assert t.put(_entry(i)) and t.touch(snap.meta.key)
    assert t.put(_entry(4))                                                 # over budget: evicts LRU
    assert t.contains(snap.meta.key) and not t.contains(_entry(1).meta.key)
    assert not t.touch("0" * 32)
    t.close()
    t, _ = _tier(d, capacity_mb=0.25)                                       # smaller budget after a restart
    assert t.contains(snap.meta.key), "the snapshot is the most recently touched entry"
    t.close()
