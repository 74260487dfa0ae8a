"""The cold storage tier: encoded KV entries as files in one directory, under a
byte budget, least recently used out first (this is the last tier: what it
evicts is deleted, after the ``on_evict`` callback has seen it).

Contract (``kv3d_core.contracts.tier.StorageTier``) and how it is met here:

- One file per entry, ``<key>.kv3d``, in the format of
  :mod:`kv3d_tier_ssd.fileformat` (no pickle; header and payload checksummed).
  Keys must be lowercase hex (16..128 digits): anything else is refused before
  it gets near a path. Files are created 0600, the directory 0700 if missing.
  Every file operation is relative to a descriptor of the directory opened once,
  so the directory path cannot be swapped under the tier.
- :meth:`SsdTier.put`: temp file in the same directory, write, fsync, atomic
  rename, fsync of the directory. Any ``OSError`` drops that write (temp file
  removed, ``on_dropped("disk_full")`` or ``on_dropped("io_error")``, False);
  a refused entry gives ``on_dropped`` ``"bad_key"``, ``"bad_meta"``, ``"model"``
  (another model's fingerprint) or ``"too_large"``. Budget accounting is by file
  size (header included; filesystem block rounding is not counted).
- :meth:`SsdTier.get`: opens with ``O_NOFOLLOW`` (a symlink is never followed),
  checks for a regular file, verifies header digest, exact size, format
  version, model fingerprint, the metadata the index holds and the payload
  digest. Any failure is a miss: the entry is removed and ``on_error(reason)``
  counts it, reason one of ``"missing"``, ``"symlink"``, ``"not_file"``,
  ``"truncated"``, ``"format"``, ``"checksum"``, ``"version"``, ``"model"``,
  ``"codec"``, ``"meta"``, ``"io"``. It never raises. A hit refreshes the file's
  mtime, which is the recency a restart rebuilds the LRU order from.
- Eviction hands ``on_evict`` the exact entry: the victim is opened before it is
  unlinked and read (and verified) outside the lock -- one extra read per
  eviction, only when ``on_evict`` is set.
- Start-up (constructor): scans the directory, removes leftover temp files,
  indexes every entry whose header is valid (payload digests are checked on
  ``get``), oldest mtime first. Damaged entry files (bad magic, header digest,
  wrong size, a symlink or non-file under an entry name) are removed; the
  reasons are reported through ``on_error`` once :meth:`SsdTier.bind` gives the
  callback. Files of another format version are left in place and ignored (a
  different kv3d version may share the directory).
- :meth:`SsdTier.bind` keeps only entries of the bound model fingerprint (until
  it is called there is no fingerprint filter; afterwards ``put`` refuses and
  ``get`` never returns another model's entry). Entries of
  other models stay on disk, unindexed and not counted in :attr:`used_bytes`,
  so switching models back and forth keeps both caches; ``remove_foreign=True``
  deletes them instead. Then the index is evicted down to the budget.
- Systemic faults: a write dropped for ``"io_error"`` or ``"disk_full"`` makes the
  core call :meth:`SsdTier.check` (with backoff) until it passes. ``check``
  re-creates the directory if it was deleted (and re-opens it if it was replaced,
  re-indexing what the new one holds), refuses while the path is not a directory
  or the free space is less than the write that hit a full disk needed, and
  proves the directory writable with a probe file (write, fsync, unlink).
- :meth:`SsdTier.touch` refreshes an entry's place in the LRU order and its mtime
  without reading it.
- Threads: ``put``/``get``/``delete`` of any keys may run concurrently. Renames,
  unlinks and index updates happen under one lock; the writing and reading of
  file bytes happen outside it. As entries are only ever replaced by atomic
  rename, a reader sees either a complete old file or a complete new one. One
  directory belongs to one running server (two processes sharing a directory
  remove each other's temp files at start-up and do not share budgets).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from kv3d_core.contracts.tier import EntryMeta, Evicted, StorageTier, TierEntry
from kv3d_core.errors import ConfigError

from kv3d_tier_ssd import fileformat as ff

log = logging.getLogger("kv3d.tier.ssd")

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_O_TEMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class _Record:
    meta: EntryMeta
    size: int
    gen: int
    """Bumped by every put of the key: tells a reader whether the file it read is
    still the one the index holds."""


class SsdTier(StorageTier):
    """Cold tier on local disk. Settings (``conf/tier/ssd.yaml`` of this package): ``path``,
    ``capacity_mb``, ``fsync``, ``checksum``, ``remove_foreign``."""

    name = "ssd"
    level = "cold"
    persistent = True

    def __init__(self, path: str, capacity_mb: float = 4096, fsync: bool = True, checksum: str = "blake2b",
                 remove_foreign: bool = False, **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"tier ssd: path must be a directory path, got {path!r}")
        if isinstance(capacity_mb, bool) or not isinstance(capacity_mb, (int, float)) or capacity_mb < 0:
            raise ConfigError(f"tier ssd: capacity_mb must be a number >= 0, got {capacity_mb!r}")
        for key, value in (("fsync", fsync), ("remove_foreign", remove_foreign)):
            if not isinstance(value, bool):
                raise ConfigError(f"tier ssd: {key} must be true or false, got {value!r}")
        try:
            self._checksum = ff.checksum_by_name(checksum)
        except ValueError as exc:
            raise ConfigError(f"tier ssd: {exc}") from exc
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self._capacity = int(float(capacity_mb) * 1024 * 1024)
        self._fsync = fsync
        self._remove_foreign = remove_foreign
        self.model_fingerprint = ""
        self.on_evict = None
        self.on_error = None
        self.on_dropped = None
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Record] = OrderedDict()
        self._used = 0
        self._gen = itertools.count(1)
        self._temp_seq = itertools.count(1)
        self._stamp = 0
        self._closed = False
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._bound = False
        self._need_bytes = 0               # size of the last write a full disk refused
        self.startup_problems: Counter[str] = Counter()
        """Reasons of damaged entry files removed (or unreadable) at start-up (or by the
        last re-scan of a re-created directory)."""
        self.startup_removed_temp = 0
        self._dirfd = self._open_dir()
        try:
            self._scan()
        except BaseException:
            os.close(self._dirfd)
            raise

    # -- start-up ---------------------------------------------------------------------------------
    def _open_dir(self) -> int:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"tier ssd: cannot use directory {self.path!r}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if st.st_mode & 0o022:
            log.warning("tier ssd: directory %s is writable by other users (mode %o); "
                        "entries stay checksummed but others can delete or plant files",
                        self.path, stat.S_IMODE(st.st_mode))
        return fd

    def _scan(self) -> None:
        found: list[tuple[int, str, _Record]] = []
        with os.scandir(self._dirfd) as it:
            for de in it:
                name = de.name
                if ff.is_temp(name):
                    if self._unlink(name):
                        self.startup_removed_temp += 1
                    continue
                key = ff.key_of(name)
                if key is None:
                    continue  # not ours: left alone
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    self.startup_problems["io"] += 1
                    continue
                if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                    self.startup_problems["symlink" if stat.S_ISLNK(st.st_mode) else "not_file"] += 1
                    self._unlink(name)
                    continue
                try:
                    fd = os.open(name, _O_READ, dir_fd=self._dirfd)
                except OSError as exc:
                    self.startup_problems["symlink" if exc.errno == errno.ELOOP else "io"] += 1
                    continue
                try:
                    st = os.fstat(fd)
                    header = ff.read_header(fd, st.st_size) if stat.S_ISREG(st.st_mode) else None
                except ff.FormatError as exc:
                    if exc.reason == "version":
                        self._foreign(name, "format version")
                    else:
                        self.startup_problems[exc.reason] += 1
                        self._unlink(name)
                    continue
                except OSError:
                    self.startup_problems["io"] += 1
                    continue
                finally:
                    os.close(fd)
                if header is None:
                    self.startup_problems["not_file"] += 1
                    continue
                if header.meta.key != key:
                    self.startup_problems["format"] += 1
                    self._unlink(name)
                    continue
                found.append((st.st_mtime_ns, key, _Record(header.meta, header.size, 0)))
        found.sort(key=lambda f: (f[0], f[1]))
        for mtime_ns, key, rec in found:
            rec.gen = next(self._gen)
            self._index[key] = rec
            self._used += rec.size
            self._stamp = max(self._stamp, mtime_ns)
        if found or self.startup_problems or self.startup_removed_temp:
            log.info("tier ssd: %s: %d entries (%.1f MiB) found, %d temp files removed, damaged: %s",
                     self.path, len(found), self._used / 2**20, self.startup_removed_temp,
                     dict(self.startup_problems) or "none")

    def _foreign(self, name: str, why: str) -> None:
        if self._remove_foreign:
            self._unlink(name)
        else:
            log.debug("tier ssd: ignoring %s (%s)", name, why)

    def bind(self, *, model_fingerprint: str, on_evict: Evicted | None = None,
             on_error: Callable[[str], None] | None = None,
             on_dropped: Callable[[str], None] | None = None) -> None:
        """Keep only the entries of ``model_fingerprint``, report start-up damage to
        ``on_error``, then evict down to the budget."""
        super().bind(model_fingerprint=model_fingerprint, on_evict=on_evict, on_error=on_error,
                     on_dropped=on_dropped)
        with self._lock:
            for key in [k for k, r in self._index.items() if r.meta.model_fingerprint != model_fingerprint]:
                rec = self._index.pop(key)
                self._used -= rec.size
                self._foreign(ff.file_name(key), "model fingerprint")
            victims = self._make_room(0, keep=None)
            problems, self._bound = (self.startup_problems if not self._bound else Counter()), True
        if victims:
            log.info("tier ssd: %s: %d least recently used entries evicted to fit the budget of %.1f MiB",
                     self.path, len(victims), self._capacity / 2**20)
        self._hand_over(victims)
        if on_error is not None:
            for reason, n in problems.items():
                for _ in range(n):
                    on_error(reason)

    # -- the contract ---------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def put(self, entry: TierEntry) -> bool:
        meta = entry.meta
        if not ff.valid_key(meta.key):
            log.warning("tier ssd: refused an entry with invalid key %r", str(meta.key)[:80])
            return self._drop("bad_key")
        if self.model_fingerprint and meta.model_fingerprint != self.model_fingerprint:
            return self._drop("model")
        try:
            enc = ff.encode(meta, entry.payload, self._checksum)
        except ValueError as exc:
            log.warning("tier ssd: refused entry %s: %s", meta.key, exc)
            return self._drop("bad_meta")
        if enc.size > self._capacity:
            return self._drop("too_large")
        meta = enc.meta
        if not self._enter():
            return False
        try:
            victims, error = self._write(meta, enc)
        finally:
            self._leave()
        self._hand_over(victims)
        if error is not None:
            reason = "disk_full" if error.errno in _DISK_FULL else "io_error"
            if reason == "disk_full":
                self._need_bytes = enc.size
            log.warning("tier ssd: write of %s dropped (%s): %s", meta.key, reason, error)
            return self._drop(reason)
        return True

    def _write(self, meta: EntryMeta, enc: ff.Encoded) -> tuple[list[tuple[_Record, int]], OSError | None]:
        """Temp file, write, fsync, rename, fsync of the directory. Returns the evicted
        entries and the OSError that dropped the write, if any."""
        final = ff.file_name(meta.key)
        tmp = ff.temp_name(meta.key, os.getpid(), next(self._temp_seq))
        fd = -1
        try:
            fd = os.open(tmp, _O_TEMP, 0o600, dir_fd=self._dirfd)
            _write_all(fd, enc.head)
            _write_all(fd, enc.payload)
            _write_all(fd, enc.trailer)
            with self._lock:
                stamp = self._next_stamp()
            os.utime(fd, ns=(stamp, stamp))  # before the fsync, so the recency is durable too
            if self._fsync:
                os.fsync(fd)
            with self._lock:
                os.rename(tmp, final, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
                old = self._index.pop(meta.key, None)
                if old is not None:
                    self._used -= old.size
                gen = next(self._gen)
                self._index[meta.key] = _Record(meta, enc.size, gen)
                self._used += enc.size
                victims = self._make_room(0, keep=meta.key)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._unlink(tmp)
            return [], exc
        os.close(fd)
        if self._fsync:
            try:
                os.fsync(self._dirfd)
            except OSError as exc:  # the rename may not survive a crash: drop the entry
                self._remove_if(meta.key, gen)
                return victims, exc
        return victims, None

    def get(self, key: str) -> TierEntry | None:
        if not ff.valid_key(key) or not self._enter():
            return None
        try:
            return self._get(key)
        except Exception:  # the contract: never raise from get
            log.exception("tier ssd: unexpected failure reading %s", key)
            return None
        finally:
            self._leave()

    def _get(self, key: str) -> TierEntry | None:
        with self._lock:
            rec = self._index.get(key)
            if rec is None:
                return None
            self._index.move_to_end(key)
            want, gen = rec.meta, rec.gen
        try:
            fd = os.open(ff.file_name(key), _O_READ, dir_fd=self._dirfd)
        except OSError as exc:
            reason = {errno.ENOENT: "missing", errno.ELOOP: "symlink"}.get(exc.errno, "io")
            return self._fail(key, gen, reason)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._fail(key, gen, "not_file")
            header = ff.read_header(fd, st.st_size)
            got = header.meta
            if got.key != key:
                return self._fail(key, gen, "format")
            if self.model_fingerprint and got.model_fingerprint != self.model_fingerprint:
                return self._fail(key, gen, "model")
            differs = ff.mismatch(want, got)
            if differs is not None:
                with self._lock:  # a put of the same key may have replaced the file since
                    now = self._index.get(key)
                    replaced = now is not None and now.gen != gen and ff.mismatch(now.meta, got) is None
                if not replaced:
                    return self._fail(key, gen, differs)
            payload = ff.read_payload(fd, header)
            try:
                with self._lock:
                    stamp = self._next_stamp()
                    os.utime(fd, ns=(stamp, stamp))
            except OSError:
                pass  # recency after a restart is best effort
            return TierEntry(got, payload)
        except ff.FormatError as exc:
            return self._fail(key, gen, exc.reason)
        except OSError:
            return self._fail(key, gen, "io")
        finally:
            os.close(fd)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def touch(self, key: str) -> bool:
        if not ff.valid_key(key):
            return False
        with self._lock:
            if self._closed or key not in self._index:
                return False
            self._index.move_to_end(key)
            stamp = self._next_stamp()
            try:
                os.utime(ff.file_name(key), ns=(stamp, stamp), dir_fd=self._dirfd, follow_symlinks=False)
            except OSError:
                pass  # recency after a restart is best effort
            return True

    def check(self) -> str | None:
        try:
            return self._check_dir() or self._check_space() or self._probe_write()
        except Exception as exc:  # the contract: never raise
            log.exception("tier ssd: health check failed")
            return f"cold tier directory {self.path}: check failed ({type(exc).__name__}: {exc})"

    def _check_dir(self) -> str | None:
        """The directory at :attr:`path` is the one held open; re-create or re-open it if not."""
        if self._closed:
            return "the cold tier is closed"
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            try:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            except OSError as exc:
                return f"cold tier directory {self.path} is gone and cannot be re-created: {exc.strerror}"
            return self._reopen("was deleted: re-created")
        except OSError as exc:
            return f"cold tier directory {self.path}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"cold tier path {self.path} is not a directory"
        held = os.fstat(self._dirfd)
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino) or held.st_nlink == 0:
            return self._reopen("was replaced: re-opened")
        return None

    def _reopen(self, what: str) -> str | None:
        """Hold the directory now at :attr:`path` instead; index what it holds."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return f"cold tier directory {self.path} cannot be opened: {exc.strerror}"
        with self._lock:
            while self._active:
                self._idle.wait()
            if self._closed:
                os.close(fd)
                return "the cold tier is closed"
            old, self._dirfd = self._dirfd, fd
            lost = len(self._index)
            self._index.clear()
            self._used = 0
            self.startup_problems = Counter()
            self.startup_removed_temp = 0
            self._scan()
            for key in [k for k, r in self._index.items()
                        if self.model_fingerprint and r.meta.model_fingerprint != self.model_fingerprint]:
                self._used -= self._index.pop(key).size
                self._foreign(ff.file_name(key), "model fingerprint")
            victims = self._make_room(0, keep=None)
            problems = self.startup_problems
        os.close(old)
        log.warning("tier ssd: directory %s %s; %d entries of the old one lost, %d found in it",
                    self.path, what, lost, len(self._index))
        self._hand_over(victims)
        for reason, n in problems.items():
            for _ in range(n):
                self._report(reason)
        return None

    def _check_space(self) -> str | None:
        """After a full disk: refuse until the write it refused would fit."""
        if not self._need_bytes:
            return None
        st = os.fstatvfs(self._dirfd)
        free = st.f_bavail * st.f_frsize
        if free < self._need_bytes:
            return (f"cold tier disk full: {free / 2**20:.1f} MiB free in {self.path}, "
                    f"a write needs {self._need_bytes / 2**20:.1f} MiB")
        self._need_bytes = 0
        return None

    def _probe_write(self) -> str | None:
        """Write, fsync and remove a small temp file: the directory takes writes."""
        name = ff.temp_name("0" * 32, os.getpid(), next(self._temp_seq))
        fd = -1
        try:
            fd = os.open(name, _O_TEMP, 0o600, dir_fd=self._dirfd)
            _write_all(fd, b"\0" * 4096)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.unlink(name, dir_fd=self._dirfd)
            os.fsync(self._dirfd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._unlink(name)
            what = "disk full" if exc.errno in _DISK_FULL else exc.strerror
            return f"cold tier directory {self.path} does not take writes: {what}"
        return None

    def delete(self, key: str) -> None:
        with self._lock:
            rec = self._index.pop(key, None)
            if rec is None:
                return
            self._used -= rec.size
            if not self._closed:
                self._unlink(ff.file_name(key))

    def entries(self) -> Iterable[EntryMeta]:
        with self._lock:
            return [r.meta for r in self._index.values()]

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Release the directory once in-flight calls are done; the files stay for the
        next start. Afterwards ``put`` returns False and ``get`` None."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._idle.wait()
            os.close(self._dirfd)

    def _enter(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    # -- helpers -----------------------------------------------------------------------------------------
    def _next_stamp(self) -> int:
        """A strictly increasing mtime (ns) under the lock: exact LRU order after a restart
        even when the clock is coarser than the rate of puts and hits."""
        self._stamp = max(time.time_ns(), self._stamp + 1)
        return self._stamp

    def _unlink(self, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=self._dirfd)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("tier ssd: cannot remove %s: %s", name, exc)
            return False

    def _make_room(self, extra: int, keep: str | None) -> list[tuple[_Record, int]]:
        """Under the lock: evict least recently used entries (not ``keep``) until
        ``used + extra`` fits. Returns ``(record, fd or -1)``: the fd, opened before the
        unlink when ``on_evict`` wants the entry, is read outside the lock."""
        victims = []
        while self._used + extra > self._capacity:
            key = next((k for k in self._index if k != keep), None)
            if key is None:
                break
            rec = self._index.pop(key)
            self._used -= rec.size
            name = ff.file_name(key)
            fd = -1
            if self.on_evict is not None:
                try:
                    fd = os.open(name, _O_READ, dir_fd=self._dirfd)
                except OSError:
                    fd = -1
            self._unlink(name)
            victims.append((rec, fd))
        return victims

    def _hand_over(self, victims: list[tuple[_Record, int]]) -> None:
        """Give evicted entries to ``on_evict`` (outside the lock), verified like a get."""
        for rec, fd in victims:
            if fd < 0:
                continue
            try:
                header = ff.read_header(fd, os.fstat(fd).st_size)
                entry = TierEntry(header.meta, ff.read_payload(fd, header))
            except ff.FormatError as exc:
                self._report(exc.reason)
                continue
            except OSError:
                self._report("io")
                continue
            finally:
                os.close(fd)
            if self.on_evict is not None:
                self.on_evict(entry)

    def _remove_if(self, key: str, gen: int) -> bool:
        """Remove ``key`` if the index still holds generation ``gen`` of it."""
        with self._lock:
            rec = self._index.get(key)
            if rec is None or rec.gen != gen:
                return False
            del self._index[key]
            self._used -= rec.size
            if not self._closed:
                self._unlink(ff.file_name(key))
            return True

    def _fail(self, key: str, gen: int, reason: str) -> None:
        """A damaged read: remove the entry (unless a newer put replaced it) and count it."""
        if self._remove_if(key, gen):
            log.warning("tier ssd: entry %s damaged (%s), removed", key, reason)
            self._report(reason)
        return None

    def _report(self, reason: str) -> None:
        if self.on_error is not None:
            self.on_error(reason)

    def _drop(self, reason: str) -> bool:
        if self.on_dropped is not None:
            self.on_dropped(reason)
        return False
