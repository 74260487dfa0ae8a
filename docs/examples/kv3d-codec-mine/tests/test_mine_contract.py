"""kv3d's codec contract, run against the mine codec (pip install -e '.[test]'; pytest)."""

import pytest

from kv3d_codec_mine.codec import MineCodec
from kv3d_core.testing import CodecContract


class TestMineCodec(CodecContract):
    # lossless = True: the contract expects every value back bit for bit, inf and NaN included

    @pytest.fixture(params=[0, 6])
    def codec(self, request):
        return MineCodec(level=request.param)


def test_bad_level():
    with pytest.raises(ValueError):
        MineCodec(level=10)
