"""The ``mine`` codec: float16 K/V values with their high bytes and low bytes in two planes
(the high bytes -- sign and exponent -- repeat a lot), positions in front, zlib over it all.

Its bytes: ``b"MINE" | u32 n | JSON layout (n bytes) | zlib(positions int32, high bytes,
low bytes)``. kv3d puts its own header (codec id, version) in front and takes it off again.
"""

import json
import struct
import zlib

import numpy as np

from kv3d_core.contracts import DeltaCodec, KVArrays
from kv3d_core.errors import CodecError

HEAD = struct.Struct("<4sI")


class MineCodec(DeltaCodec):
    codec_id = "mine"
    version = 1
    lossless = True

    def __init__(self, level: int = 6):
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
            raise ValueError(f"mine: level must be an integer within 0..9, not {level!r}")
        self.level = level

    def encode(self, arrays: KVArrays) -> bytes:
        layout = {"n": arrays.n_cells, "k": [x.shape[1] for x in arrays.k], "v": [x.shape[1] for x in arrays.v],
                  "hk": arrays.head_dim_k, "hv": arrays.head_dim_v, "extra": arrays.extra}
        head = json.dumps(layout, sort_keys=True).encode()
        values = b"".join(np.ascontiguousarray(x, "<f2").tobytes() for x in (*arrays.k, *arrays.v))
        planes = np.frombuffer(values, np.uint8).reshape(-1, 2).T      # [low bytes, high bytes]
        body = np.ascontiguousarray(arrays.positions, "<i4").tobytes() + planes[::-1].tobytes()
        return HEAD.pack(b"MINE", len(head)) + head + zlib.compress(body, self.level)

    def decode(self, data) -> KVArrays:
        data = bytes(data)                      # kv3d may hand over a memoryview
        if len(data) < HEAD.size or data[:4] != b"MINE":
            raise CodecError("not a mine payload")
        (n_head,) = struct.unpack_from("<I", data, 4)
        try:
            layout = json.loads(data[HEAD.size:HEAD.size + n_head])
            n, kw, vw = int(layout["n"]), [int(w) for w in layout["k"]], [int(w) for w in layout["v"]]
            hk, hv, extra = int(layout["hk"]), int(layout["hv"]), layout["extra"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CodecError(f"mine: damaged layout: {exc}") from exc
        if (n < 0 or hk < 1 or hv < 1 or len(kw) != len(vw) or not isinstance(extra, dict)
                or any(w < 1 or w % hk for w in kw) or any(w < 1 or w % hv for w in vw)):
            raise CodecError("mine: impossible layout")
        size = 4 * n + 2 * n * (sum(kw) + sum(vw))
        z = zlib.decompressobj()
        try:
            body = z.decompress(data[HEAD.size + n_head:], size + 1)
        except zlib.error as exc:
            raise CodecError(f"mine: damaged body: {exc}") from exc
        if len(body) != size or not z.eof or z.unused_data or z.unconsumed_tail:
            raise CodecError("mine: body of the wrong size, truncated or followed by other bytes")
        high, low = np.frombuffer(body, np.uint8, offset=4 * n).reshape(2, -1)
        values = np.stack([low, high], axis=1).reshape(-1).view("<f2")
        out, at = [], 0
        for w in kw + vw:
            out.append(values[at:at + n * w].reshape(n, w).astype(np.float16))
            at += n * w
        positions = np.frombuffer(body, "<i4", n).astype(np.int32)
        return KVArrays(positions, out[:len(kw)], out[len(kw):], hk, hv, extra)
