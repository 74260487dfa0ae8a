"""Key names and the manifest of one entry in the store.

Every key starts with the configured ``prefix``. The keys the Lua scripts touch
together carry the hash tag ``{prefix}`` so that on a cluster they live in one
slot (a script may only touch one); the chunks do not, so a cluster spreads them
over its nodes::

    {P}:lru              sorted set: member -> recency (a store-wide counter: LRU across servers)
    {P}:size             hash: member -> bytes it counts against the budget
    {P}:bytes            integer: sum of {P}:size, the budget's use
    {P}:clock            integer: the recency counter
    {P}:w:<fp>           hash: entry key -> member, one per model fingerprint
    {P}:feed             stream: puts and removals announced to other servers (scripts.py)
    {P}:feedn            integer: the feed's sequence number
    {P}:m:<member>       the entry's manifest (below); published last, read first
    P:c:<member>:<wid>:<i>   chunk i of the entry's bytes, written under a fresh wid each put

    member = <fp>:<ns>:<key>

``<fp>`` and ``<ns>`` are 16 hex digits of a blake2b digest of the model fingerprint
and of the entry's namespace (tenant and ``cache_salt``): models and tenants never
share a key, and the entry's own header (checked on every read) must name the
same model and a namespace of the same digest.

The entry's bytes are exactly an SSD tier entry file (:mod:`kv3d_tier_ssd.fileformat`:
versioned header with the model fingerprint and codec id/version, xxh3 digests of
header and whole entry), cut into chunks. The manifest is::

    8  magic b"KV3DRM01"
    16 wid, ASCII hex: names this put's chunks
    4  number of chunks (u32 LE)
    8  size of the entry's bytes (u64 LE)
    .. the entry's head (fileformat ``Encoded.head``: its header, with its own digest)

so the index (``entries()``) is rebuilt from manifests alone, and a reader knows
which chunks to fetch. Chunks are never overwritten (a new put has a new wid), so
a reader sees either a whole entry or a missing chunk, never a mix.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from kv3d_tier_ssd import fileformat as ff

MAGIC = b"KV3DRM01"
_FIXED = struct.Struct("<8s16sIQ")


def digest16(text: str) -> str:
    """16 hex digits naming ``text`` (a fingerprint or a namespace) in key names."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"kv3d-redis").hexdigest()


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def base(self) -> str:
        return "{" + self.prefix + "}"

    def member(self, fp: str, ns: str, key: str) -> str:
        return f"{fp}:{ns}:{key}"

    def manifest(self, member: str) -> str:
        return f"{self.base}:m:{member}"

    def where(self, fp: str) -> str:
        return f"{self.base}:w:{fp}"

    @property
    def lru(self) -> str:
        return f"{self.base}:lru"

    @property
    def bytes(self) -> str:
        return f"{self.base}:bytes"

    @property
    def feed(self) -> str:
        return f"{self.base}:feed"

    def chunks(self, member: str, wid: str, n: int) -> list[str]:
        return [f"{self.prefix}:c:{member}:{wid}:{i}" for i in range(n)]


def split_member(member: str) -> tuple[str, str, str]:
    """``(fp, ns, key)`` of a member; ValueError if it is not one."""
    parts = member.split(":")
    if len(parts) != 3:
        raise ValueError(f"not a member: {member[:80]!r}")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Manifest:
    wid: str
    n_chunks: int
    size: int
    header: ff.Header


def make_manifest(wid: str, n_chunks: int, enc: ff.Encoded) -> bytes:
    return _FIXED.pack(MAGIC, wid.encode("ascii"), n_chunks, enc.size) + enc.head


def read_manifest(data: bytes) -> Manifest:
    """The manifest in ``data``; :class:`~kv3d_tier_ssd.fileformat.FormatError` if damaged
    (its head carries its own digest; the fields before it are checked against it)."""
    if len(data) < _FIXED.size:
        raise ff.FormatError("truncated", f"manifest of {len(data)} bytes")
    magic, wid, n_chunks, size = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise ff.FormatError("format", "bad manifest magic")
    try:
        wid_s = wid.decode("ascii")
        int(wid_s, 16)
    except ValueError as exc:
        raise ff.FormatError("format", "bad manifest write id") from exc
    header = ff.header_of_head(data[_FIXED.size:])
    if size != header.size:
        raise ff.FormatError("format", f"manifest announces {size} bytes, the header {header.size}")
    if n_chunks < 1 or n_chunks > size:
        raise ff.FormatError("format", f"{n_chunks} chunks for {size} bytes")
    return Manifest(wid_s, n_chunks, size, header)
