"""kv3d delta codec plugin ``int8``: int8 codes with an absmax scale per token per
KV head, zstd over codes and scales (see :mod:`kv3d_codec_int8.codec`)."""

__version__ = "0.1.0"
