"""The ``int8`` codec against the delta codec contract (``kv3d_core.testing``).

Bound (module docstring of :mod:`kv3d_codec_int8.codec`): per value, half a scale step
plus one float16 ulp, the step being the group's absmax / 127 (rounded up to a float16):
at most 1/254 * (1 + 2**-10) + 0.75 * 2**-10 of the layer's absmax, under 0.005.
Integrity: CRC-32 over metadata and scales, zstd frame checksums over the codes, so with
zstd on every damage is detected; with ``zstd_level=0`` the raw codes are not checked.
"""

from __future__ import annotations

import pytest

from kv3d_codec_int8.codec import Int8Codec
from kv3d_core.testing import CodecContract


class TestInt8(CodecContract):
    max_rel_error = 0.005
    nonfinite = "refuse"
    detects_damage = True

    @pytest.fixture
    def codec(self):
        return Int8Codec()


class TestInt8NumpyKernels(TestInt8):
    """The numpy decoder and quantizer (used when the compiled kernel was not built)."""

    @pytest.fixture
    def codec(self):
        return Int8Codec(kernel="numpy", threads=2, decode_threads=2)


class TestInt8NoZstd(TestInt8):
    detects_damage = False

    @pytest.fixture
    def codec(self):
        return Int8Codec(zstd_level=0)
