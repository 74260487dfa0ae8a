"""The built-in ``none`` codec: f16 KV as-is (optionally zstd) -- the lossless
A/B baseline every other codec is measured against.

Its bytes (the core frames them, :mod:`kv3d_core.kv.framing`): :func:`~kv3d_core.kv.framing.pack_meta`
of the layout metadata (plus ``zstd``), then positions (int32) and every K then V layer
(float16), one zstd frame over them when ``zstd_level`` > 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from kv3d_core.contracts.codec import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError
from kv3d_core.hookspecs import hookimpl
from kv3d_core.kv import framing


def layout_meta(a: KVArrays) -> dict:
    """The layout fields every codec's metadata carries. CodecError when the layout is one
    :func:`check_layout` would refuse on decode (a codec never writes what it cannot read)."""
    meta = {
        "n_cells": a.n_cells,
        "k_width": [int(x.shape[1]) for x in a.k],
        "v_width": [int(x.shape[1]) for x in a.v],
        "head_dim_k": a.head_dim_k,
        "head_dim_v": a.head_dim_v,
        "extra": a.extra,
    }
    check_layout(meta)
    return meta


def check_layout(meta: dict) -> tuple[int, list[int], list[int]]:
    """(n_cells, K widths, V widths) of a payload's metadata, checked: every field present,
    ``extra`` a dict, head dims positive, every width a whole number of heads (as
    :class:`KVArrays` requires). CodecError otherwise."""
    try:
        n = int(meta["n_cells"])
        kw = [int(x) for x in meta["k_width"]]
        vw = [int(x) for x in meta["v_width"]]
        hk, hv = int(meta["head_dim_k"]), int(meta["head_dim_v"])
        extra = meta["extra"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"codec metadata incomplete: {exc}") from exc
    if not isinstance(extra, dict):
        raise CodecError("codec metadata: extra is not an object")
    if n < 0 or len(kw) != len(vw) or hk <= 0 or hv <= 0 or any(w <= 0 for w in kw + vw):
        raise CodecError("codec metadata has impossible shapes")
    if any(w % hk for w in kw) or any(w % hv for w in vw):
        raise CodecError(f"codec metadata: K/V widths {kw}/{vw} are not whole heads of {hk}/{hv}")
    return n, kw, vw


class NoneCodec(DeltaCodec):
    codec_id = "none"
    version = 1
    lossless = True

    def __init__(self, zstd_level: int = 0, **unknown: object) -> None:
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        self.zstd_level = int(zstd_level)

    def encode(self, arrays: KVArrays) -> bytes:
        parts = [np.ascontiguousarray(arrays.positions, dtype="<i4").tobytes()]
        parts += [np.ascontiguousarray(x, dtype="<f2").tobytes() for x in arrays.k]
        parts += [np.ascontiguousarray(x, dtype="<f2").tobytes() for x in arrays.v]
        raw = b"".join(parts)
        meta = layout_meta(arrays)
        meta["zstd"] = self.zstd_level > 0
        if self.zstd_level > 0:
            raw = zstandard.ZstdCompressor(level=self.zstd_level).compress(raw)
        return framing.pack_meta(meta, raw)

    def decode(self, data: bytes) -> KVArrays:
        meta, payload = framing.unpack_meta(data)
        n, kw, vw = check_layout(meta)
        expected = 4 * n + 2 * n * (sum(kw) + sum(vw))
        if meta.get("zstd"):
            try:
                # allow_extra_data=False: bytes after the frame are damage, not padding
                raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected,
                                                              allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise CodecError(f"zstd payload damaged: {exc}") from exc
        else:
            raw = payload
        if len(raw) != expected:
            raise CodecError(f"payload holds {len(raw)} bytes, layout needs {expected}")
        buf = np.frombuffer(raw, dtype=np.uint8)
        off = 4 * n
        positions = buf[:off].view("<i4").copy()
        k, v = [], []
        for widths, out in ((kw, k), (vw, v)):
            for w in widths:
                size = 2 * n * w
                out.append(buf[off:off + size].view("<f2").reshape(n, w))
                off += size
        return KVArrays(positions, k, v, int(meta["head_dim_k"]), int(meta["head_dim_v"]), dict(meta["extra"]))


@dataclass
class NoneSettings:
    """The ``codec`` node of ``codec=none`` (``configs/codec/none.yaml``)."""

    zstd_level: int = 0


@hookimpl
def register_codecs(register):
    register("none", NoneCodec, settings=NoneSettings)
