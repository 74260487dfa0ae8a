"""The ``collab`` codec's block side (``encode_blocks``, ``manifest_keys``,
``decode_blocks_into``): what the conformance suite, which sees no blocks, cannot check."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d_codec_collab.codec import CollabCodec
from kv3d_codec_int8.codec import Int8Codec
from kv3d_core.contracts import KVArrays
from kv3d_core.errors import CodecError

N, B = 37, 8                     # four whole blocks and a tail of five cells


def arrays(seed: int = 0, n: int = N, start: int = 100) -> KVArrays:
    rng = np.random.default_rng(seed)
    k = [rng.standard_normal((n, 128)).astype(np.float16) for _ in range(3)]
    v = [rng.standard_normal((n, 64)).astype(np.float16) for _ in range(3)]
    return KVArrays(np.arange(start, start + n, dtype=np.int32), k, v, 64, 64, {"n_stream": 1})


def alloc(t: KVArrays) -> KVArrays:
    return KVArrays(t.positions.copy(), [np.full(x.shape, np.nan, np.float16) for x in t.k],
                    [np.full(x.shape, np.nan, np.float16) for x in t.v], t.head_dim_k, t.head_dim_v, t.extra)


KEYS = [f"{i:040x}" for i in range(N // B)]


@pytest.mark.parametrize("threads", [1, 2])
def test_blocks_decode_to_int8s_values_and_lossless_blocks_exactly(threads):
    a = arrays()
    codec = CollabCodec(block_tokens=B, decode_threads=threads)
    manifest, blocks = codec.encode_blocks(a, KEYS, lambda k: False)
    assert sorted(blocks) == KEYS and codec.manifest_keys(manifest) == KEYS
    got = codec.decode_blocks_into(manifest, blocks.__getitem__, alloc)
    whole = Int8Codec().decode(Int8Codec().encode(a))          # int8 scales per token and head: the same values
    assert got.positions.tolist() == a.positions.tolist() and got.extra == a.extra
    for x, y in zip(got.k + got.v, whole.k + whole.v):
        assert np.array_equal(x, y)
    exact = CollabCodec(block_tokens=B, inner="none", decode_threads=threads)
    manifest, blocks = exact.encode_blocks(a, KEYS, lambda k: False)
    got = exact.decode_blocks_into(manifest, blocks.__getitem__, alloc)
    for x, y in zip(got.k + got.v, a.k + a.v):
        assert np.array_equal(x, y)


def test_blocks_already_stored_are_not_encoded_and_a_manifest_needs_its_blocks():
    a = arrays()
    codec = CollabCodec(block_tokens=B)
    manifest, blocks = codec.encode_blocks(a, KEYS, lambda k: k in KEYS[:2])
    assert sorted(blocks) == KEYS[2:]
    with pytest.raises(CodecError, match="with its blocks"):
        codec.decode(manifest)


def test_a_block_of_other_cells_or_damaged_is_refused_and_fetch_errors_pass_through():
    codec = CollabCodec(block_tokens=B)
    manifest, blocks = codec.encode_blocks(arrays(), KEYS, lambda k: False)
    _, elsewhere = codec.encode_blocks(arrays(seed=1, start=200), KEYS, lambda k: False)
    with pytest.raises(CodecError, match="other cells"):
        codec.decode_blocks_into(manifest, lambda k: elsewhere[k] if k == KEYS[2] else blocks[k], alloc)
    bad = bytearray(blocks[KEYS[1]])
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(CodecError):
        codec.decode_blocks_into(manifest, lambda k: bytes(bad) if k == KEYS[1] else blocks[k], alloc)

    class Gone(Exception):
        pass

    def fetch(k):
        raise Gone(k)

    with pytest.raises(Gone):
        codec.decode_blocks_into(manifest, fetch, alloc)


def test_more_keys_than_whole_blocks_and_other_settings_are_refused():
    codec = CollabCodec(block_tokens=B)
    with pytest.raises(CodecError):
        codec.encode_blocks(arrays(), KEYS + ["f" * 40], lambda k: False)
    manifest, _ = codec.encode_blocks(arrays(), KEYS, lambda k: False)
    with pytest.raises(CodecError):
        CollabCodec(block_tokens=B * 2).manifest_keys(manifest)
    with pytest.raises(CodecError):
        CollabCodec(block_tokens=B, inner="none").manifest_keys(manifest)
    with pytest.raises(TypeError):
        CollabCodec(block_tokens=0)
    with pytest.raises(TypeError):
        CollabCodec(inner="block")


def test_a_contiguous_delta_writes_no_positions_and_any_other_positions_round_trip():
    codec = CollabCodec(block_tokens=B)
    a = arrays()
    manifest, blocks = codec.encode_blocks(a, KEYS, lambda k: False)
    odd = arrays()
    odd.positions = odd.positions.copy()
    odd.positions[-1] += 7                        # not contiguous: the positions are written out
    manifest_odd, blocks_odd = codec.encode_blocks(odd, KEYS, lambda k: False)
    assert len(manifest_odd) == len(manifest) + 4 * N - len(',"start":100')
    for m, bl, src in ((manifest, blocks, a), (manifest_odd, blocks_odd, odd)):
        got = codec.decode_blocks_into(m, bl.__getitem__, alloc)
        assert got.positions.tolist() == src.positions.tolist()
    bad = bytearray(manifest)
    at = bytes(bad).index(b'"start":100')
    bad[at + 8:at + 11] = b"101"                  # another start: the CRC no longer matches
    with pytest.raises(CodecError):
        codec.manifest_keys(bytes(bad))
