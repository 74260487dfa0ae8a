"""The core's framing of encoded KV payloads: a codec returns its own bytes, the core puts
its header in front of them, and strips and checks it before the codec sees them again.

::

    b"KV3C" | u8 format | u16 codec-id length | codec id (ascii) | u16 codec version   <- the core's
           | the codec's bytes                                                          <- the codec's

A codec never writes or reads this header (its bytes may start however it likes, with
its own magic and header). The tier stack stores and restores payloads through
:class:`FramedCodec` (or :func:`encode` / :func:`decode` / :func:`decode_into`), reads a
stored payload's codec id and version with :func:`peek_codec`, and refuses another
codec's or version's payload before the codec sees it. Anything unexpected -- another
codec or version, a length that runs past the end -- is a
:class:`~kv3d_core.errors.CodecError`.

Optional, for codecs that describe their layout in JSON (the built-in ``none``, ``int8``
and ``block`` do): :func:`pack_meta` / :func:`unpack_meta` write and read
``u32 meta length | meta (JSON object) | body`` as the start of the codec's bytes.
:func:`pack` / :func:`unpack` are the two together (the core's opaque fallback uses them).

Format 1 is the only one so far; it is byte for byte what kv3d stored before the core owned
the framing (when each codec wrote ``framing.pack(id, version, meta, body)`` itself), so
entries stored by older versions -- warm RAM or cold-tier files -- still decode.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable

from kv3d_core.errors import CodecError

MAGIC = b"KV3C"
FORMAT = 1
_HEAD = struct.Struct("<4sBH")
_META_LEN = struct.Struct("<I")

Bytes = "bytes | bytearray | memoryview"


# -- the core's header ----------------------------------------------------------------------
def header(codec_id: str, version: int) -> bytes:
    """The core's header for payloads of ``codec_id`` v``version``."""
    try:
        cid = codec_id.encode("ascii")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise CodecError(f"codec id {codec_id!r} is not an ASCII string") from exc
    if not cid or len(cid) > 0xFFFF or not isinstance(version, int) or not 0 <= version <= 0xFFFF:
        raise CodecError(f"codec id {codec_id!r} / version {version!r} cannot be framed (ids 1..65535 ASCII "
                         "bytes, versions 0..65535)")
    return b"".join((_HEAD.pack(MAGIC, FORMAT, len(cid)), cid, struct.pack("<H", version)))


def frame(codec_id: str, version: int, body: Bytes) -> bytes:
    """``body`` (a codec's bytes) behind the core's header."""
    return header(codec_id, version) + bytes(body)


def _header_len(mv: memoryview) -> tuple[str, int, int]:
    """(codec id, version, header length) of a framed payload."""
    if len(mv) < _HEAD.size:
        raise CodecError("encoded KV shorter than its header")
    magic, fmt, n = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC or fmt != FORMAT:
        raise CodecError("not a kv3d codec payload (bad magic or format)")
    end = _HEAD.size + n
    if len(mv) < end + 2:
        raise CodecError("encoded KV truncated in its header")
    cid = bytes(mv[_HEAD.size:end]).decode("ascii", "replace")
    (version,) = struct.unpack_from("<H", mv, end)
    return cid, version, end + 2


def peek_codec(data: Bytes) -> tuple[str, int]:
    """(codec id, version) of a framed payload."""
    cid, version, _ = _header_len(memoryview(data))
    return cid, version


def unframe(data: Bytes, codec_id: str, version: int) -> memoryview:
    """The codec's bytes of a framed payload (a view, no copy), after checking that
    ``codec_id`` v``version`` wrote it."""
    mv = memoryview(data)
    cid, ver, end = _header_len(mv)
    if cid != codec_id or ver != version:
        raise CodecError(f"payload was encoded by codec {cid!r} v{ver}, not {codec_id!r} v{version}")
    return mv[end:]


# -- the core's side of the codec contract -----------------------------------------------------
def encode(codec: Any, arrays: Any) -> bytes:
    """``codec.encode(arrays)`` framed with the codec's id and version."""
    body = codec.encode(arrays)
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise CodecError(f"codec {codec.codec_id!r} returned {type(body).__name__} from encode, not bytes")
    return frame(codec.codec_id, codec.version, body)


def decode(codec: Any, data: Bytes) -> Any:
    """``codec.decode`` of the codec's bytes of a framed payload (refused when another
    codec or version framed it)."""
    return codec.decode(unframe(data, codec.codec_id, codec.version))


def decode_into(codec: Any, data: Bytes, alloc: Callable[[Any], Any]) -> Any:
    """``codec.decode_into`` of the codec's bytes of a framed payload."""
    return codec.decode_into(unframe(data, codec.codec_id, codec.version), alloc)


class FramedCodec:
    """A codec as the core stores it: :meth:`encode` returns the framed payload,
    :meth:`decode` / :meth:`decode_into` take one. ``codec_id``, ``version`` and
    ``lossless`` are the wrapped codec's; ``inner`` is the codec itself."""

    def __init__(self, codec: Any) -> None:
        if isinstance(codec, FramedCodec):
            codec = codec.inner
        self.inner = codec
        self.codec_id: str = codec.codec_id
        self.version: int = codec.version
        self.lossless: bool = bool(getattr(codec, "lossless", False))
        header(self.codec_id, self.version)            # an id or version that cannot be framed fails here

    def encode(self, arrays: Any) -> bytes:
        return encode(self.inner, arrays)

    def decode(self, data: Bytes) -> Any:
        return decode(self.inner, data)

    def decode_into(self, data: Bytes, alloc: Callable[[Any], Any]) -> Any:
        return decode_into(self.inner, data, alloc)

    def __repr__(self) -> str:
        return f"FramedCodec({self.inner!r})"


# -- optional JSON metadata at the start of a codec's bytes --------------------------------------
def pack_meta(meta: dict, body: Bytes) -> bytes:
    """``u32 length | meta as JSON | body``: a codec's bytes led by its JSON metadata."""
    m = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return b"".join((_META_LEN.pack(len(m)), m, bytes(body)))


def unpack_meta(data: Bytes) -> tuple[dict, memoryview]:
    """(metadata, body) of what :func:`pack_meta` wrote. CodecError when the length runs
    past the end or the metadata is not a JSON object."""
    mv = memoryview(data)
    if len(mv) < _META_LEN.size:
        raise CodecError("encoded KV truncated before its metadata")
    (mlen,) = _META_LEN.unpack_from(mv, 0)
    off = _META_LEN.size
    if off + mlen > len(mv):
        raise CodecError("encoded KV truncated in its metadata")
    try:
        meta = json.loads(bytes(mv[off:off + mlen]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"codec metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CodecError("codec metadata is not a JSON object")
    return meta, mv[off + mlen:]


def pack(codec_id: str, version: int, meta: dict, payload: Bytes) -> bytes:
    """The core's header, then :func:`pack_meta` of ``meta`` and ``payload``."""
    return frame(codec_id, version, pack_meta(meta, payload))


def unpack(data: Bytes, codec_id: str, version: int) -> tuple[dict, memoryview]:
    """(metadata, body) of what :func:`pack` wrote, checking the codec id and version."""
    return unpack_meta(unframe(data, codec_id, version))
