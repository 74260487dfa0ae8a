"""The ``ssd`` cold tier against the storage tier contract (``kv3d_core.testing``)."""

from __future__ import annotations

import os

import pytest

from kv3d_core.testing import TierContract
from kv3d_tier_ssd import fileformat as ff
from kv3d_tier_ssd.tier import SsdTier


class TestSsdTier(TierContract):
    @pytest.fixture
    def tier(self, tmp_path):
        return SsdTier(str(tmp_path / "cold"), capacity_mb=0.25)

    def reopen(self, tier):
        return SsdTier(tier.path, capacity_mb=tier.capacity_bytes / 2**20)

    def damage(self, tier, key):
        path = os.path.join(tier.path, ff.file_name(key))
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))


class TestSsdTierXxh3NoFsync(TestSsdTier):
    """The other checksum, without fsync (as on a machine that opts out of durability)."""

    @pytest.fixture
    def tier(self, tmp_path):
        return SsdTier(str(tmp_path / "cold"), capacity_mb=0.25, checksum="xxh3", fsync=False)

    def reopen(self, tier):
        return SsdTier(tier.path, capacity_mb=tier.capacity_bytes / 2**20, checksum="xxh3", fsync=False)
