"""On-disk format of one cold-tier entry file: fixed little-endian layout, no
pickle, every byte covered by a checksum.

Layout (``D`` is the digest size of the checksum algorithm named in the prefix)::

    offset      size  field
    0           8     magic  b"KV3DCOLD"
    8           2     format version (u16), currently 1
    10          1     checksum algorithm id (u8): 1 = blake2b-256, 2 = xxh3-128
    11          1     reserved, 0
    12          4     header body length H (u32)
    16          H     header body (below)
    16+H        D     header digest: checksum of bytes [0, 16+H)
    16+H+D      P     payload (opaque encoded KV bytes)
    16+H+D+P    D     trailer digest: checksum of every byte before it
                      (prefix, header, header digest AND payload)

Header body::

    i64 codec_version, i64 n_prefix, i64 f16_bytes, u64 n_tokens, u64 payload_len
    6 strings, each u32 byte length + UTF-8 bytes, in this order:
        key, kind, namespace, family, codec_id, model_fingerprint
    n_tokens x int32 token ids (little-endian)

The header digest lets the start-up scan trust an entry's metadata (for the
index) without reading its payload; the trailer digest is checked on every read.
A file's size must equal the size its header announces exactly. Readers raise
:class:`FormatError` with a short ``reason``: ``"truncated"``, ``"format"``
(bad magic, malformed header), ``"version"`` (other format version or an
unknown checksum algorithm), ``"checksum"``.

The same bytes held in memory (the ``redis`` tier stores them, chunked) are read
with :func:`decode` (every check above) and :func:`header_of_head` (a head alone,
for an index).

File names are ``<key>.kv3d`` where the key is lowercase hex of 16..128 digits
(:func:`valid_key`); temp files are ``<key>.kv3d.<pid>.<n>.tmp``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from kv3d_core.contracts.tier import EntryMeta

MAGIC = b"KV3DCOLD"
FORMAT_VERSION = 1
SUFFIX = ".kv3d"
MAX_HEADER = 64 << 20
"""Largest header body accepted (16M tokens): a corrupt length never makes a reader allocate more."""
MAX_STRING = 4096
"""Longest string field, in UTF-8 bytes."""

_PREFIX = struct.Struct("<8sHBBI")
_FIXED = struct.Struct("<qqqQQ")
_LEN = struct.Struct("<I")
_KEY_RE = re.compile(r"[0-9a-f]{16,128}")
_ENTRY_RE = re.compile(r"([0-9a-f]{16,128})\.kv3d")
_TEMP_RE = re.compile(r"[0-9a-f]{16,128}\.kv3d\.[0-9]+\.[0-9]+\.tmp")
_TOKENS = np.dtype("<i4")


class FormatError(Exception):
    """An entry file is damaged or not of this format; ``reason`` names how."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- checksums -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checksum:
    id: int
    name: str
    size: int
    new: Callable[[], Any]
    """A fresh hasher with ``update(buffer)`` and ``digest()``."""


def _blake2b() -> Checksum:
    return Checksum(1, "blake2b", 32, lambda: hashlib.blake2b(digest_size=32, person=b"kv3d-cold"))


def _xxh3() -> Checksum | None:
    try:
        import xxhash
    except ImportError:
        return None
    return Checksum(2, "xxh3", 16, xxhash.xxh3_128)


def checksum_by_name(name: str) -> Checksum:
    """The algorithm ``name`` (``"blake2b"`` or ``"xxh3"``); ValueError if unknown or
    not installed."""
    if name == "blake2b":
        return _blake2b()
    if name == "xxh3":
        cs = _xxh3()
        if cs is None:
            raise ValueError("checksum 'xxh3' needs the package xxhash: pip install 'kv3d-tier-ssd[xxh3]'")
        return cs
    raise ValueError(f"unknown checksum {name!r}; choose 'blake2b' or 'xxh3'")


def checksum_by_id(cid: int) -> Checksum | None:
    if cid == 1:
        return _blake2b()
    if cid == 2:
        return _xxh3()
    return None


# -- names -------------------------------------------------------------------------------------
def valid_key(key: object) -> bool:
    """True for lowercase hex of 16..128 digits: the only keys that name files."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def file_name(key: str) -> str:
    if not valid_key(key):
        raise ValueError(f"invalid entry key {key!r}: must be lowercase hex of 16..128 digits")
    return key + SUFFIX


def temp_name(key: str, pid: int, n: int) -> str:
    return f"{file_name(key)}.{pid}.{n}.tmp"


def key_of(name: str) -> str | None:
    """The key an entry file name stands for, or None if it is not one."""
    m = _ENTRY_RE.fullmatch(name)
    return m.group(1) if m else None


def is_temp(name: str) -> bool:
    return _TEMP_RE.fullmatch(name) is not None


# -- metadata ------------------------------------------------------------------------------------
def normalized(meta: EntryMeta) -> EntryMeta:
    """``meta`` with plain ``int`` fields and a read-only int32 copy of its tokens;
    ValueError if it cannot be stored exactly."""
    tokens = np.asarray(meta.tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    t32 = tokens.astype(np.int32, copy=True)
    if not np.array_equal(t32, tokens):
        raise ValueError("token ids do not fit int32")
    t32.setflags(write=False)
    for field in ("key", "kind", "namespace", "family", "codec_id", "model_fingerprint"):
        value = getattr(meta, field)
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a str, got {type(value).__name__}")
    return replace(meta, tokens=t32, n_prefix=int(meta.n_prefix), codec_version=int(meta.codec_version),
                   f16_bytes=int(meta.f16_bytes))


def mismatch(expected: EntryMeta, got: EntryMeta) -> str | None:
    """None if equal; ``"codec"`` if the codec id/version differ, else ``"meta"``."""
    if (expected.codec_id, expected.codec_version) != (got.codec_id, got.codec_version):
        return "codec"
    same = (expected.key == got.key and expected.kind == got.kind and expected.namespace == got.namespace
            and expected.family == got.family and expected.n_prefix == got.n_prefix
            and expected.model_fingerprint == got.model_fingerprint and expected.f16_bytes == got.f16_bytes
            and np.array_equal(np.asarray(expected.tokens), np.asarray(got.tokens)))
    return None if same else "meta"


# -- encoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """An entry file as three buffers written in order, and the metadata it holds."""

    meta: EntryMeta
    """As :func:`normalized` returns it."""
    head: bytes
    payload: memoryview
    trailer: bytes

    @property
    def size(self) -> int:
        return len(self.head) + self.payload.nbytes + len(self.trailer)


def encode(meta: EntryMeta, payload: bytes, checksum: Checksum, *, version: int = FORMAT_VERSION) -> Encoded:
    """The file bytes of ``(meta, payload)``; ValueError if a field cannot be stored.
    ``version`` other than :data:`FORMAT_VERSION` is only for writing test vectors."""
    meta = normalized(meta)
    view = memoryview(payload).cast("B")
    try:
        fixed = _FIXED.pack(meta.codec_version, meta.n_prefix, meta.f16_bytes, meta.tokens.size, view.nbytes)
    except struct.error as exc:
        raise ValueError(f"integer field out of range: {exc}") from exc
    parts = [fixed]
    for s in (meta.key, meta.kind, meta.namespace, meta.family, meta.codec_id, meta.model_fingerprint):
        b = s.encode("utf-8")  # UnicodeEncodeError is a ValueError
        if len(b) > MAX_STRING:
            raise ValueError(f"string field of {len(b)} bytes exceeds {MAX_STRING}")
        parts += [_LEN.pack(len(b)), b]
    parts.append(meta.tokens.astype(_TOKENS, copy=False).tobytes())
    body = b"".join(parts)
    if len(body) > MAX_HEADER:
        raise ValueError(f"header of {len(body)} bytes exceeds {MAX_HEADER}")
    prefix = _PREFIX.pack(MAGIC, version, checksum.id, 0, len(body))
    h = checksum.new()
    h.update(prefix)
    h.update(body)
    head = prefix + body + h.digest()
    t = checksum.new()
    t.update(head)
    t.update(view)
    return Encoded(meta, head, view, t.digest())


# -- decoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    meta: EntryMeta
    payload_len: int
    checksum: Checksum
    head: bytes
    """The file's bytes before the payload (the trailer digest starts with them)."""

    @property
    def size(self) -> int:
        return len(self.head) + self.payload_len + self.checksum.size


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            raise FormatError("truncated", f"file ends {n - got} bytes early")
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _parse_body(body: bytes) -> tuple[EntryMeta, int]:
    if len(body) < _FIXED.size:
        raise FormatError("format", "header body too short")
    codec_version, n_prefix, f16_bytes, n_tokens, payload_len = _FIXED.unpack_from(body, 0)
    pos = _FIXED.size
    strings = []
    for _ in range(6):
        if pos + _LEN.size > len(body):
            raise FormatError("format", "header body too short for its strings")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if n > MAX_STRING or pos + n > len(body):
            raise FormatError("format", "string field length out of range")
        try:
            strings.append(body[pos:pos + n].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise FormatError("format", "string field is not UTF-8") from exc
        pos += n
    if len(body) - pos != 4 * n_tokens:
        raise FormatError("format", f"{len(body) - pos} token bytes for {n_tokens} tokens")
    tokens = np.frombuffer(body, dtype=_TOKENS, count=n_tokens, offset=pos).astype(np.int32)
    tokens.setflags(write=False)
    key, kind, namespace, family, codec_id, fingerprint = strings
    meta = EntryMeta(key=key, kind=kind, namespace=namespace, family=family, tokens=tokens,
                     n_prefix=n_prefix, codec_id=codec_id, codec_version=codec_version,
                     model_fingerprint=fingerprint, f16_bytes=f16_bytes)
    return meta, payload_len


def read_header(fd: int, file_size: int) -> Header:
    """Check and parse the header of the open entry file ``fd`` of ``file_size`` bytes
    (header digest verified, size checked against the header; payload not read)."""
    return _read_header(lambda n, offset: _pread_exact(fd, n, offset), file_size)


def _read_header(read: Callable[[int, int], bytes], size: int, *, head_only: bool = False) -> Header:
    """The header of an entry of ``size`` bytes whose bytes ``read(n, offset)`` returns;
    ``head_only``: ``size`` is that of the head alone (the entry's is the one announced)."""
    if size < _PREFIX.size:
        raise FormatError("truncated", f"{size} bytes")
    prefix = read(_PREFIX.size, 0)
    magic, version, cid, reserved, hlen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FormatError("format", "bad magic")
    if version != FORMAT_VERSION:
        raise FormatError("version", f"format version {version}, this reader knows {FORMAT_VERSION}")
    checksum = checksum_by_id(cid)
    if checksum is None:
        raise FormatError("version", f"checksum algorithm {cid} unknown or not installed")
    if reserved != 0 or not _FIXED.size <= hlen <= MAX_HEADER:
        raise FormatError("format", "bad header length")
    if _PREFIX.size + hlen + (1 if head_only else 2) * checksum.size > size:
        raise FormatError("truncated", "file shorter than its header")
    rest = read(hlen + checksum.size, _PREFIX.size)
    h = checksum.new()
    h.update(prefix)
    h.update(memoryview(rest)[:hlen])
    if not hmac.compare_digest(h.digest(), rest[hlen:]):
        raise FormatError("checksum", "header digest")
    meta, payload_len = _parse_body(rest[:hlen])
    header = Header(meta, payload_len, checksum, prefix + rest)
    want = len(header.head) if head_only else header.size
    if size < want:
        raise FormatError("truncated", f"{size} bytes, header announces {want}")
    if size > want:
        raise FormatError("format", f"{size} bytes, header announces {want}")
    return header


def read_payload(fd: int, header: Header) -> bytes:
    """The payload of the open entry file ``fd``, its trailer digest verified."""
    offset = len(header.head)
    payload = _pread_exact(fd, header.payload_len, offset) if header.payload_len else b""
    trailer = _pread_exact(fd, header.checksum.size, offset + header.payload_len)
    t = header.checksum.new()
    t.update(header.head)
    t.update(payload)
    if not hmac.compare_digest(t.digest(), trailer):
        raise FormatError("checksum", "payload digest")
    return payload


# -- in memory (entries kept elsewhere than in files, e.g. the redis tier) ------------------------
def _slicer(data: bytes | memoryview) -> Callable[[int, int], bytes]:
    view = memoryview(data).cast("B")

    def read(n: int, offset: int) -> bytes:
        if offset + n > view.nbytes:
            raise FormatError("truncated", f"{view.nbytes} bytes, {offset + n} needed")
        return bytes(view[offset:offset + n])
    return read


def header_of_head(head: bytes) -> Header:
    """The header of an entry from its :attr:`Encoded.head` bytes alone: header digest
    verified, nothing may follow the header digest."""
    return _read_header(_slicer(head), len(head), head_only=True)


def decode(data: bytes | memoryview) -> tuple[Header, bytes]:
    """``(header, payload)`` of a whole entry held in memory: every check a file read
    makes (header digest, exact size, payload digest)."""
    read = _slicer(data)
    header = _read_header(read, memoryview(data).nbytes)
    offset = len(header.head)
    payload = read(header.payload_len, offset) if header.payload_len else b""
    trailer = read(header.checksum.size, offset + header.payload_len)
    t = header.checksum.new()
    t.update(header.head)
    t.update(payload)
    if not hmac.compare_digest(t.digest(), trailer):
        raise FormatError("checksum", "payload digest")
    return header, payload
