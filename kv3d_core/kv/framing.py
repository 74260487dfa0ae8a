"""The header every encoded KV payload starts with, shared by all codecs.

::

    b"KV3C" | u8 format | u16 codec-id length | codec id (ascii) | u16 codec version
           | u32 meta length | meta (JSON object) | payload

``unpack`` checks every field and raises :class:`~kv3d_core.errors.CodecError`
on anything unexpected: another codec or version, a length that runs past the
end, a meta that is not a JSON object.
"""

from __future__ import annotations

import json
import struct

from kv3d_core.errors import CodecError

MAGIC = b"KV3C"
FORMAT = 1
_HEAD = struct.Struct("<4sBH")


def pack(codec_id: str, version: int, meta: dict, payload: bytes | bytearray | memoryview) -> bytes:
    cid = codec_id.encode("ascii")
    m = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((_HEAD.pack(MAGIC, FORMAT, len(cid)), cid, struct.pack("<HI", version, len(m)), m, payload))


def peek_codec(data: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(codec id, version) of an encoded payload."""
    mv = memoryview(data)
    if len(mv) < _HEAD.size:
        raise CodecError("encoded KV shorter than its header")
    magic, fmt, n = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC or fmt != FORMAT:
        raise CodecError("not a kv3d codec payload (bad magic or format)")
    end = _HEAD.size + n
    if len(mv) < end + 6:
        raise CodecError("encoded KV truncated in its header")
    cid = bytes(mv[_HEAD.size:end]).decode("ascii", "replace")
    (version,) = struct.unpack_from("<H", mv, end)
    return cid, version


def unpack(data: bytes | bytearray | memoryview, codec_id: str, version: int) -> tuple[dict, memoryview]:
    mv = memoryview(data)
    cid, ver = peek_codec(mv)
    if cid != codec_id or ver != version:
        raise CodecError(f"payload was encoded by codec {cid!r} v{ver}, not {codec_id!r} v{version}")
    off = _HEAD.size + len(cid.encode("ascii")) + 2
    (mlen,) = struct.unpack_from("<I", mv, off)
    off += 4
    if off + mlen > len(mv):
        raise CodecError("encoded KV truncated in its metadata")
    try:
        meta = json.loads(bytes(mv[off:off + mlen]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"codec metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CodecError("codec metadata is not a JSON object")
    return meta, mv[off + mlen:]
