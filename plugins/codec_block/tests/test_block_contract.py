"""The ``block`` codec against the delta codec contract (``kv3d_core.testing``).

Bound (module docstring of :mod:`kv3d_codec_block.codec`): per value, half a step plus one
float16 ulp. With ``offset`` the step is at most the group's range / 15 (range <= 2 x the
layer's absmax): 1/15 * (1 + 2**-10) + 0.75 * 2**-10 of the absmax, under 0.07. Symmetric
(``offset=False``): the step is at most absmax / 7, so under 0.075. Integrity: CRC-32 over
metadata and scales; the 4-bit codes are checked only by zstd frames (``zstd_level > 0``).
"""

from __future__ import annotations

import pytest

from kv3d_codec_block.codec import BlockCodec
from kv3d_core.testing import CodecContract


class TestBlock(CodecContract):
    max_rel_error = 0.07
    nonfinite = "refuse"
    detects_damage = False

    @pytest.fixture
    def codec(self):
        return BlockCodec()


class TestBlockSymmetric(TestBlock):
    max_rel_error = 0.075

    @pytest.fixture
    def codec(self):
        return BlockCodec(offset=False, group_size=16)


class TestBlockZstd(TestBlock):
    detects_damage = True

    @pytest.fixture
    def codec(self):
        return BlockCodec(zstd_level=3, threads=2)
