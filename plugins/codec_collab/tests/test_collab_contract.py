"""The ``collab`` codec against the delta codec contract (``kv3d_core.testing``), on its own
(a manifest with no blocks: a family snapshot, or a delta shorter than a block), with each
inner codec.

Bound: the inner codec's -- int8's (half a scale step plus one float16 ulp, under 0.005 of the
layer's absmax), or bit-exact with ``inner=none``. Integrity: a CRC-32 over the manifest's
metadata, positions and tail, and the inner payloads' own checks.
"""

from __future__ import annotations

import pytest

from kv3d_codec_collab.codec import CollabCodec
from kv3d_core.testing import CodecContract


class TestCollabInt8(CodecContract):
    max_rel_error = 0.005
    nonfinite = "refuse"
    detects_damage = True

    @pytest.fixture
    def codec(self):
        return CollabCodec()


class TestCollabLossless(CodecContract):
    detects_damage = True

    @pytest.fixture
    def codec(self):
        return CollabCodec(inner="none", block_tokens=4)


class TestCollabSerialDecode(TestCollabInt8):
    @pytest.fixture
    def codec(self):
        return CollabCodec(decode_threads=1, block_tokens=2)
