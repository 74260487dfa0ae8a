"""Entry point of the ``codec_int8`` plugin: registers the ``int8`` delta codec."""

from kv3d_core import hookimpl


@hookimpl
def register_codecs(register):
    from kv3d_codec_int8.codec import Int8Codec

    register("int8", Int8Codec)
