"""The conformance tests of ``kv3d_core.testing`` run against the built-in plugins: the
``none`` codec, the RAM tier and the ``exact`` and ``radix`` detectors. (The installable
plugins run them in their own ``tests/``.) No model is loaded."""

from __future__ import annotations

import pytest

from kv3d_core.contracts.tier import TierEntry
from kv3d_core.kv.codec_none import NoneCodec
from kv3d_core.prefix.detectors import ExactDetector, RadixDetector
from kv3d_core.testing import CodecContract, DetectorContract, TierContract
from kv3d_core.tiers.ram import RamTier


class TestNoneCodec(CodecContract):
    """Lossless (bit-exact, inf/NaN kept). No checksum of its own: the tiers checksum
    what they store, so a damaged payload may decode to other, well-formed values."""

    @pytest.fixture
    def codec(self):
        return NoneCodec()


class TestNoneCodecZstd(TestNoneCodec):
    @pytest.fixture
    def codec(self):
        return NoneCodec(zstd_level=3)


class TestRamTier(TierContract):
    @pytest.fixture
    def tier(self):
        return RamTier(capacity_mb=0.25)

    def damage(self, tier, key):
        # the RAM tier holds the payload object it was given; swap in altered bytes
        with tier._lock:
            entry, crc = tier._entries[key]
            bad = bytearray(entry.payload)
            bad[len(bad) // 2] ^= 0x01
            tier._entries[key] = (TierEntry(entry.meta, bytes(bad)), crc)


class TestExactDetector(DetectorContract):
    @pytest.fixture
    def detector(self):
        return ExactDetector()


class TestRadixDetector(DetectorContract):
    @pytest.fixture
    def detector(self):
        return RadixDetector()
