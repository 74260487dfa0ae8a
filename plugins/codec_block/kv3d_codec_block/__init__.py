"""kv3d delta codec plugin ``block``: 4-bit codes in groups of 32 values with a
float16 scale and offset per group (see :mod:`kv3d_codec_block.codec`)."""

__version__ = "0.1.0"
