"""The cold tier plugin ``tier_ssd``: real files in ``tmp_path``.

Round trip, LRU under the budget, persistence across instances, every damage
mode a clean counted miss, refused keys, kill -9 during writes, concurrent
put/get of one key, disk full (fault injection), the plugin manager and the
Hydra node, and a timing report of a ~6 MB get next to a plain read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from kv3d_core.config import compose
from kv3d_core.contracts.tier import EntryMeta, TierEntry
from kv3d_core.errors import ConfigError, PluginError
from kv3d_core.plugins import make_plugin_manager, plugin_settings
from kv3d_tier_ssd import fileformat as ff
from kv3d_tier_ssd import tier as tier_mod
from kv3d_tier_ssd.tier import SsdTier

FP = "0123456789abcdef0123456789abcdef"
OTHER_FP = "fedcba9876543210fedcba9876543210"
MiB = 1 << 20


def key(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def payload_of(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def meta_of(k: str, tokens=None, *, fp: str = FP, codec_version: int = 1, **kw) -> EntryMeta:
    tokens = np.arange(40, dtype=np.int32) if tokens is None else np.asarray(tokens, dtype=np.int32)
    fields = dict(key=k, kind="session", namespace="a1" * 16, family="b2" * 16, tokens=tokens, n_prefix=8,
                  codec_id="int8", codec_version=codec_version, model_fingerprint=fp,
                  f16_bytes=int(tokens.size) * 23040)
    fields.update(kw)
    return EntryMeta(**fields)


def entry_of(i: int, size: int = 64 * 1024, **kw) -> TierEntry:
    return TierEntry(meta_of(key(i), np.arange(i, i + 40), **kw), payload_of(i, size))


@dataclass
class Calls:
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    evicted: list[TierEntry] = field(default_factory=list)


def open_tier(path: Path, capacity_mb: float = 64, fp: str = FP, **settings) -> tuple[SsdTier, Calls]:
    calls = Calls()
    t = SsdTier(path=str(path), capacity_mb=capacity_mb, **settings)
    t.bind(model_fingerprint=fp, on_evict=calls.evicted.append, on_error=calls.errors.append,
           on_dropped=calls.dropped.append)
    return t, calls


def same_meta(a: EntryMeta, b: EntryMeta) -> bool:
    return ff.mismatch(a, b) is None


def entry_path(d: Path, k: str) -> Path:
    return d / f"{k}.kv3d"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def write_encoded(path: Path, enc: ff.Encoded) -> None:
    path.write_bytes(enc.head + bytes(enc.payload) + enc.trailer)


# -- basics ---------------------------------------------------------------------------------------
def test_round_trip_delete_contains(tmp_path):
    d = tmp_path / "a" / "cold"  # created, with parents
    t, calls = open_tier(d)
    tokens = np.array([0, 1, 2**31 - 1, -2**31, 7], dtype=np.int32)
    meta = meta_of(key(1), tokens, namespace="ns-é", family="fam", n_prefix=3, codec_version=7,
                   f16_bytes=2**40 + 3, kind="snapshot")
    payload = payload_of(1, 100_003)
    assert t.put(TierEntry(meta, payload))
    assert t.contains(key(1)) and len(t) == 1
    got = t.get(key(1))
    assert got is not None and got.payload == payload
    assert same_meta(got.meta, meta)
    assert got.meta.tokens.dtype == np.int32 and np.array_equal(got.meta.tokens, tokens)
    assert (got.meta.n_prefix, got.meta.codec_version, got.meta.f16_bytes) == (3, 7, 2**40 + 3)
    assert [m.key for m in t.entries()] == [key(1)]
    assert t.used_bytes == entry_path(d, key(1)).stat().st_size
    # empty payload, empty tokens
    empty = TierEntry(meta_of(key(2), np.zeros(0, np.int32), n_prefix=0), b"")
    assert t.put(empty)
    got2 = t.get(key(2))
    assert got2 is not None and got2.payload == b"" and got2.meta.tokens.size == 0
    # delete
    t.delete(key(1))
    t.delete(key(1))  # absent: no-op
    assert not t.contains(key(1)) and t.get(key(1)) is None
    assert not entry_path(d, key(1)).exists()
    assert t.used_bytes == entry_path(d, key(2)).stat().st_size
    assert calls.errors == [] and calls.dropped == []
    t.close()
    assert t.get(key(2)) is None and not t.put(entry_of(3))


def test_permissions_names_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    t, _ = open_tier("~/cache/cold")  # type: ignore[arg-type]
    d = tmp_path / "cache" / "cold"
    assert t.path == str(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for i in range(3):
        assert t.put(entry_of(i))
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(f"{key(i)}.kv3d" for i in range(3))
    assert all(stat.S_IMODE((d / n).stat().st_mode) == 0o600 for n in names)
    t.close()


def test_overwrite_same_key(tmp_path):
    t, calls = open_tier(tmp_path)
    assert t.put(TierEntry(meta_of(key(5), np.arange(10)), payload_of(1, 5000)))
    new = TierEntry(meta_of(key(5), np.arange(30)), payload_of(2, 9000))
    assert t.put(new)
    got = t.get(key(5))
    assert got is not None and got.payload == new.payload and same_meta(got.meta, new.meta)
    assert len(t) == 1 and t.used_bytes == entry_path(tmp_path, key(5)).stat().st_size
    assert calls.errors == []


def test_lru_eviction_under_budget(tmp_path):
    t, calls = open_tier(tmp_path, capacity_mb=1)
    size = 300_000  # 3 fit in 1 MiB, 4 do not
    for i in range(3):
        assert t.put(entry_of(i, size))
        assert t.used_bytes <= t.capacity_bytes
    assert t.get(key(0)) is not None  # 0 is now the most recent; 1 the least
    assert t.put(entry_of(3, size))
    assert t.used_bytes <= t.capacity_bytes
    assert [e.meta.key for e in calls.evicted] == [key(1)]
    assert calls.evicted[0].payload == payload_of(1, size)  # on_evict gets the exact entry
    assert not entry_path(tmp_path, key(1)).exists()
    assert {m.key for m in t.entries()} == {key(0), key(2), key(3)}
    assert t.put(entry_of(4, size))
    assert [e.meta.key for e in calls.evicted] == [key(1), key(2)]
    assert t.used_bytes <= t.capacity_bytes
    assert t.used_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert calls.errors == [] and calls.dropped == []


def test_entry_larger_than_capacity(tmp_path):
    t, calls = open_tier(tmp_path, capacity_mb=1)
    assert t.put(entry_of(0, 100_000))
    assert not t.put(entry_of(1, MiB))  # payload alone is the whole budget; with the header it is over
    assert calls.dropped == ["too_large"]
    assert not t.contains(key(1)) and t.contains(key(0))
    assert [p.name for p in tmp_path.iterdir()] == [f"{key(0)}.kv3d"]


# -- persistence -------------------------------------------------------------------------------------
def test_persistence_and_recency_across_restart(tmp_path):
    size = 300_000
    t, _ = open_tier(tmp_path, capacity_mb=1)
    for i in range(3):
        assert t.put(entry_of(i, size))
    assert t.get(key(0)) is not None  # LRU order now: 1, 2, 0
    t.close()
    t2, calls = open_tier(tmp_path, capacity_mb=1)
    # least recently used first, rebuilt from the files' mtimes (the get of 0 refreshed it)
    assert [m.key for m in t2.entries()] == [key(1), key(2), key(0)]
    for i in range(3):
        got = t2.get(key(i))
        assert got is not None and got.payload == payload_of(i, size)
        assert same_meta(got.meta, entry_of(i, 1).meta)
    assert calls.errors == []
    t2.close()


def test_restart_lru_order_drives_eviction(tmp_path):
    size = 300_000
    t, _ = open_tier(tmp_path, capacity_mb=1)
    for i in range(3):
        assert t.put(entry_of(i, size))
    assert t.get(key(0)) is not None
    t.close()
    t2, calls = open_tier(tmp_path, capacity_mb=1)
    assert t2.put(entry_of(3, size))
    assert [e.meta.key for e in calls.evicted] == [key(1)]


def test_smaller_budget_after_restart_evicts_lru(tmp_path):
    t, _ = open_tier(tmp_path, capacity_mb=2)
    for i in range(6):
        assert t.put(entry_of(i, 300_000))
    t.close()
    t2, calls = open_tier(tmp_path, capacity_mb=1)
    assert t2.used_bytes <= t2.capacity_bytes
    assert [e.meta.key for e in calls.evicted] == [key(i) for i in range(3)]
    assert {m.key for m in t2.entries()} == {key(i) for i in range(3, 6)}


def test_other_model_entries_ignored_or_removed(tmp_path):
    t, _ = open_tier(tmp_path)
    for i in range(3):
        assert t.put(entry_of(i))
    t.close()
    other, calls = open_tier(tmp_path, fp=OTHER_FP)
    assert list(other.entries()) == [] and other.used_bytes == 0
    assert other.get(key(0)) is None and calls.errors == []
    assert not other.put(entry_of(9))  # an entry of another model than the bound one is refused
    assert calls.dropped == ["model"]
    other.close()
    assert len(list(tmp_path.iterdir())) == 3  # left in place for when that model comes back
    back, _ = open_tier(tmp_path)
    assert len(back) == 3 and back.get(key(2)).payload == payload_of(2, 64 * 1024)
    back.close()
    purge, _ = open_tier(tmp_path, fp=OTHER_FP, remove_foreign=True)
    assert list(tmp_path.iterdir()) == []
    purge.close()


# -- damage: each a clean miss, counted with its reason ------------------------------------------------
def _truncate(p: Path, t: SsdTier) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip_payload(p: Path, t: SsdTier) -> None:
    flip(p, p.stat().st_size - 32 - 1000)


def _flip_header(p: Path, t: SsdTier) -> None:
    flip(p, 16 + 8 + 40 + 3)  # inside the header body's strings


def _flip_trailer(p: Path, t: SsdTier) -> None:
    flip(p, p.stat().st_size - 1)


def _flip_magic(p: Path, t: SsdTier) -> None:
    flip(p, 2)


def _reencode(p: Path, version: int = ff.FORMAT_VERSION, **changes) -> None:
    """Rewrite the entry file at ``p`` as a fully valid file (both digests right) with
    some fields changed."""
    fd = os.open(p, os.O_RDONLY)
    try:
        header = ff.read_header(fd, os.fstat(fd).st_size)
        payload = ff.read_payload(fd, header)
    finally:
        os.close(fd)
    write_encoded(p, ff.encode(replace(header.meta, **changes), payload, header.checksum, version=version))


def _version(p: Path, t: SsdTier) -> None:
    _reencode(p, version=2)


def _model(p: Path, t: SsdTier) -> None:
    _reencode(p, model_fingerprint=OTHER_FP)


def _codec(p: Path, t: SsdTier) -> None:
    _reencode(p, codec_version=2)


def _other_tokens(p: Path, t: SsdTier) -> None:
    _reencode(p, tokens=np.arange(41, dtype=np.int32))


def _swapped(p: Path, t: SsdTier) -> None:
    e = entry_of(12345)  # a valid entry of another key under this key's name
    write_encoded(p, ff.encode(e.meta, e.payload, ff.checksum_by_name("blake2b")))


def _symlink_outside(p: Path, t: SsdTier) -> None:
    outside = p.parent.parent / "outside.bin"
    outside.write_bytes(p.read_bytes())  # even a valid copy must not be followed
    p.unlink()
    p.symlink_to(outside)


def _missing(p: Path, t: SsdTier) -> None:
    p.unlink()


def _fifo(p: Path, t: SsdTier) -> None:
    p.unlink()
    os.mkfifo(p)


DAMAGE = [
    (_truncate, "truncated"), (_flip_payload, "checksum"), (_flip_header, "checksum"),
    (_flip_trailer, "checksum"), (_flip_magic, "format"), (_version, "version"), (_model, "model"),
    (_codec, "codec"), (_other_tokens, "meta"), (_swapped, "format"), (_symlink_outside, "symlink"),
    (_missing, "missing"), (_fifo, "not_file"),
]


@pytest.mark.parametrize("damage,reason", DAMAGE, ids=[d[0].__name__.strip("_") for d in DAMAGE])
def test_damaged_entry_is_a_counted_miss(tmp_path, damage, reason):
    d = tmp_path / "cold"
    t, calls = open_tier(d)
    assert t.put(entry_of(0)) and t.put(entry_of(1))
    p = entry_path(d, key(0))
    damage(p, t)
    assert t.get(key(0)) is None
    assert calls.errors == [reason]
    assert not t.contains(key(0)) and not os.path.lexists(p)
    assert t.get(key(0)) is None and calls.errors == [reason]  # counted once
    assert t.used_bytes == entry_path(d, key(1)).stat().st_size
    got = t.get(key(1))  # the tier keeps serving
    assert got is not None and got.payload == entry_of(1).payload
    if damage is _symlink_outside:
        assert (tmp_path / "outside.bin").stat().st_size > 0  # the target is untouched


def test_damage_found_at_startup(tmp_path):
    d = tmp_path / "cold"
    t, _ = open_tier(d)
    for i in range(7):
        assert t.put(entry_of(i))
    t.close()
    _truncate(entry_path(d, key(0)), t)
    _flip_header(entry_path(d, key(1)), t)
    _flip_payload(entry_path(d, key(2)), t)  # header fine: indexed, caught by get
    _version(entry_path(d, key(3)), t)
    _symlink_outside(entry_path(d, key(4)), t)
    _model(entry_path(d, key(5)), t)
    (d / f"{key(6)}.kv3d.123.4.tmp").write_bytes(b"partial")
    (d / "README").write_text("not ours")
    t2, calls = open_tier(d)
    assert sorted(calls.errors) == ["checksum", "symlink", "truncated"]
    assert {m.key for m in t2.entries()} == {key(2), key(6)}
    assert t2.get(key(2)) is None and calls.errors[-1] == "checksum"
    assert t2.get(key(6)).payload == entry_of(6).payload
    left = sorted(p.name for p in d.iterdir())
    # removed: truncated, header-damaged, symlink, temp file, the payload-damaged one after its get.
    # kept: other format version, other model's entry (key 5 now holds OTHER_FP), foreign file.
    assert left == sorted(["README", f"{key(3)}.kv3d", f"{key(5)}.kv3d", f"{key(6)}.kv3d"])
    assert t2.used_bytes == entry_path(d, key(6)).stat().st_size
    assert (tmp_path / "outside.bin").exists()


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "ABCDEF0123456789ABCDEF0123456789", "abc", "a" * 129,
                                 "0123456789abcdef/../../x", "0123456789abcdef\x00", "g" * 32, "",
                                 "0123456789abcdef.kv3d", " 0123456789abcdef"])
def test_bad_key_refused(tmp_path, bad):
    d = tmp_path / "cold"
    t, calls = open_tier(d)
    e = entry_of(0)
    assert not t.put(TierEntry(replace(e.meta, key=bad), e.payload))
    assert calls.dropped == ["bad_key"]
    assert list(d.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cold"]
    assert t.get(bad) is None and not t.contains(bad)
    t.delete(bad)
    assert calls.errors == []


def test_bad_meta_refused(tmp_path):
    t, calls = open_tier(tmp_path)
    e = entry_of(0)
    assert not t.put(TierEntry(replace(e.meta, tokens=np.array([2**40])), e.payload))
    assert not t.put(TierEntry(replace(e.meta, tokens=np.zeros((2, 2), np.int32)), e.payload))
    assert calls.dropped == ["bad_meta", "bad_meta"] and list(tmp_path.iterdir()) == []


# -- crashes, threads, full disks ------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from kv3d_core.contracts.tier import EntryMeta, TierEntry
    from kv3d_tier_ssd.tier import SsdTier
    path, fp, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = SsdTier(path, capacity_mb=12)
    t.bind(model_fingerprint=fp)
    i = start
    while True:
        import hashlib
        k = hashlib.blake2b(str(i % 23).encode(), digest_size=16).hexdigest()
        tokens = np.arange(i, i + 50 + i % 9, dtype=np.int32)
        payload = np.random.default_rng(i).integers(0, 256, (1 << 20) + 4096 * (i % 5), dtype=np.uint8).tobytes()
        meta = EntryMeta(key=k, kind="session", namespace="n", family="f", tokens=tokens, n_prefix=0,
                         codec_id="int8", codec_version=1, model_fingerprint=fp, f16_bytes=0)
        assert t.put(TierEntry(meta, payload))
        print(i, flush=True)
        i += 1
""")


def test_kill9_during_writes(tmp_path):
    """SIGKILL a writer while a temp file is being written (polled for), three times
    over the same directory: every listed entry must read back as exactly the
    version its metadata names, temp files must be gone."""
    d = tmp_path / "cold"
    d.mkdir(mode=0o700)
    start, temps_at_kill = 0, []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), FP, str(start)], stdout=subprocess.PIPE,
                                text=True)
        written: list[int] = []
        pump = threading.Thread(target=lambda: written.extend(int(line) for line in proc.stdout))
        pump.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if len(written) >= 6 and any(n.endswith(".tmp") for n in os.listdir(d)):
                    break  # a write is in flight: kill it now
            assert proc.poll() is None, "writer died before being killed"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            pump.join()
        temps_at_kill.append(sum(1 for n in os.listdir(d) if n.endswith(".tmp")))
        t, calls = open_tier(d, capacity_mb=12)
        assert not any(n.endswith(".tmp") for n in os.listdir(d))
        assert t.startup_removed_temp == temps_at_kill[-1]
        assert t.used_bytes <= t.capacity_bytes and len(t) > 0
        for m in t.entries():
            got = t.get(m.key)
            assert got is not None  # nothing in this test damages files: a listed entry is whole
            i = int(got.meta.tokens[0])  # the version it claims; its bytes must be exactly that version's
            assert got.payload == payload_of(i, (1 << 20) + 4096 * (i % 5))
            assert np.array_equal(got.meta.tokens, np.arange(i, i + 50 + i % 9))
        assert calls.errors == []
        t.close()
        start = written[-1] + 100
    print(f"\ntemp files left by the three kills (removed at start-up): {temps_at_kill}")


def test_concurrent_put_get_one_key(tmp_path):
    t, calls = open_tier(tmp_path, capacity_mb=64)
    k = key(0)
    size = 200_000

    def version(v: int) -> TierEntry:
        return TierEntry(meta_of(k, np.arange(v, v + 30 + v % 7)), payload_of(v, size + v))

    done = threading.Event()
    bad: list[str] = []
    hits = [0]

    def writer(first: int) -> None:
        for v in range(first, first + 60, 2):
            if not t.put(version(v)):
                bad.append(f"put {v} failed")

    def reader() -> None:
        while not done.is_set():
            got = t.get(k)
            if got is None:
                continue
            v = int(got.meta.tokens[0])
            if got.payload != version(v).payload or not same_meta(got.meta, version(v).meta):
                bad.append(f"read of version {v} does not match it")
            hits[0] += 1

    def deleter() -> None:
        while not done.is_set():
            t.delete(k)
            time.sleep(0.005)

    writers = [threading.Thread(target=writer, args=(s,)) for s in (0, 1)]
    others = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=deleter)]
    for th in writers + others:
        th.start()
    for th in writers:
        th.join()
    done.set()
    for th in others:
        th.join()
    assert bad == []
    assert hits[0] > 0
    assert calls.errors == [] and calls.dropped == []
    names = [p.name for p in tmp_path.iterdir()]
    assert names in ([], [f"{k}.kv3d"]) and t.used_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())


def _failing_write(err: int, after: int):
    real = tier_mod._write_all
    state = {"n": 0}

    def write_all(fd, data):
        view = memoryview(data)
        room = after - state["n"]
        if view.nbytes > room:
            real(fd, view[:max(room, 0)])
            state["n"] = after
            raise OSError(err, os.strerror(err))
        real(fd, view)
        state["n"] += view.nbytes
    return write_all


@pytest.mark.parametrize("err,reason", [(errno.ENOSPC, "disk_full"), (errno.EDQUOT, "disk_full"),
                                        (errno.EIO, "io_error")])
def test_write_failure_dropped(tmp_path, monkeypatch, err, reason):
    t, calls = open_tier(tmp_path)
    assert t.put(entry_of(0)) and t.put(entry_of(1))
    used = t.used_bytes
    monkeypatch.setattr(tier_mod, "_write_all", _failing_write(err, after=5000))
    replacement = TierEntry(entry_of(0).meta, payload_of(99, 64 * 1024))
    assert not t.put(replacement)  # overwrite of key 0 fails: the old version stays
    assert not t.put(entry_of(2))
    assert calls.dropped == [reason, reason]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{key(i)}.kv3d" for i in (0, 1))  # no temp left
    assert t.used_bytes == used
    assert t.get(key(0)).payload == entry_of(0).payload
    monkeypatch.undo()
    assert t.put(entry_of(2)) and t.get(key(2)).payload == entry_of(2).payload
    assert calls.errors == []


def test_directory_fsync_failure_dropped(tmp_path, monkeypatch):
    t, calls = open_tier(tmp_path)
    real = os.fsync
    dirfd = t._dirfd

    def fsync(fd):
        if fd == dirfd:
            raise OSError(errno.EIO, "injected")
        real(fd)
    monkeypatch.setattr(tier_mod.os, "fsync", fsync)
    assert not t.put(entry_of(0))
    monkeypatch.undo()
    assert calls.dropped == ["io_error"] and not t.contains(key(0)) and list(tmp_path.iterdir()) == []
    assert t.put(entry_of(0))


# -- plugin manager, configuration ------------------------------------------------------------------------
def test_plugin_manager_and_config(tmp_path):
    pm = make_plugin_manager()
    assert "ssd" in pm.names("tier")
    t = pm.create("tier", "ssd", path=str(tmp_path / "pm"), capacity_mb=1)
    assert isinstance(t, SsdTier) and t.capacity_bytes == MiB and t.level == "cold" and t.persistent
    t.close()
    with pytest.raises(PluginError, match="bogus"):
        pm.create("tier", "ssd", path=str(tmp_path / "pm"), capacity_mb=1, bogus=1)
    cfg = compose(["+tier=ssd", f"cache.ssd_cold_path={tmp_path / 'cfg'}", "cache.ssd_cold_mb=3"])
    name, settings = plugin_settings(cfg.tier)
    assert name == "ssd" and settings["path"] == str(tmp_path / "cfg") and settings["capacity_mb"] == 3
    t2 = pm.create("tier", name, **settings)
    t2.bind(model_fingerprint=FP)
    assert t2.put(entry_of(0)) and t2.get(key(0)).payload == entry_of(0).payload
    t2.close()
    name, settings = plugin_settings(compose(["tier=ssd"]).tier)
    assert settings["path"] == "~/.cache/kv3d/cold" and settings["capacity_mb"] == 4096


@pytest.mark.parametrize("bad", [{"fsync": "no"}, {"checksum": "md5"}, {"capacity_mb": -1},
                                 {"remove_foreign": 1}])
def test_bad_settings(tmp_path, bad):
    with pytest.raises(ConfigError):
        SsdTier(path=str(tmp_path), **{"capacity_mb": 1, **bad})


def test_xxh3_checksum_and_mixed_files(tmp_path):
    pytest.importorskip("xxhash")
    t, calls = open_tier(tmp_path, checksum="xxh3")
    assert t.put(entry_of(0))
    t.close()
    t2, calls2 = open_tier(tmp_path)  # blake2b writer reads the xxh3 file (the file names its algorithm)
    assert t2.get(key(0)).payload == entry_of(0).payload
    assert t2.put(entry_of(1))
    _flip_payload(entry_path(tmp_path, key(0)), t2)
    assert t2.get(key(0)) is None and calls2.errors == ["checksum"]


# -- timing report (not asserted) -------------------------------------------------------------------------
def test_report_get_time_6mb(tmp_path, capsys):
    size = 512 * 23040 // 2  # int8 K+V of a 512-token delta on SmolLM2-135M (scales excluded): 5.9 MB
    lines = []
    for checksum in ("blake2b", "xxh3"):
        if checksum == "xxh3" and ff.checksum_by_id(2) is None:
            continue
        d = tmp_path / checksum
        t, calls = open_tier(d, capacity_mb=64, checksum=checksum)
        e = entry_of(0, size)
        put_s = []
        for i in range(5):
            t0 = time.perf_counter()
            assert t.put(e)
            put_s.append(time.perf_counter() - t0)
        get_s, read_s = [], []
        path = entry_path(d, key(0))
        for _ in range(50):
            t0 = time.perf_counter()
            got = t.get(key(0))
            get_s.append(time.perf_counter() - t0)
            assert got is not None and len(got.payload) == size
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                raw = f.read()
            read_s.append(time.perf_counter() - t0)
            assert len(raw) == path.stat().st_size
        ms = lambda xs, q: 1e3 * float(np.percentile(xs, q))  # noqa: E731
        lines.append(f"{checksum:8s} get p50 {ms(get_s, 50):6.2f} ms p95 {ms(get_s, 95):6.2f} ms | "
                     f"open().read() p50 {ms(read_s, 50):6.2f} ms p95 {ms(read_s, 95):6.2f} ms | "
                     f"put (fsync) p50 {ms(put_s, 50):6.2f} ms  [{size / 1e6:.2f} MB payload]")
        t.close()
    with capsys.disabled():
        print("\n" + "\n".join(lines))
