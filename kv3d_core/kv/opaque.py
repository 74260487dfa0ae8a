"""The fallback encoding for sequence states whose layout the reader does not
understand: the whole llama.cpp blob, zstd-compressed, restored as is.

It is not a plugin codec: it never sees arrays, only bytes, and restores the
full sequence (no shared prefix). Every use is counted
(``kv3d_codec_fallback_total``).
"""

from __future__ import annotations

import zstandard

from kv3d_core.errors import CodecError
from kv3d_core.kv import framing

CODEC_ID = "opaque-zstd"
VERSION = 1


def encode(blob: bytes | bytearray | memoryview, level: int = 3) -> bytes:
    data = zstandard.ZstdCompressor(level=level).compress(blob)
    return framing.pack(CODEC_ID, VERSION, {"n": len(blob)}, data)


def decode(payload: bytes | bytearray | memoryview) -> bytes:
    meta, data = framing.unpack(payload, CODEC_ID, VERSION)
    n = meta.get("n")
    if not isinstance(n, int) or n < 0:
        raise CodecError("opaque payload without a valid length")
    try:
        blob = zstandard.ZstdDecompressor().decompress(data, max_output_size=n)
    except zstandard.ZstdError as exc:
        raise CodecError(f"opaque payload damaged: {exc}") from exc
    if len(blob) != n:
        raise CodecError(f"opaque payload holds {len(blob)} bytes, header says {n}")
    return blob
