"""Entry point of the ``codec_block`` plugin: registers the ``block`` (4-bit) delta codec."""

from kv3d_core import hookimpl


@hookimpl
def register_codecs(register):
    from kv3d_codec_block.codec import BlockCodec

    register("block", BlockCodec)
