"""kv3d delta codec plugin ``collab``: sessions share blocks of KV cells, stored once by the
core and counted by the sessions that list them; each block coded by the inner codec
(``int8`` by default, see :mod:`kv3d_codec_collab.codec`)."""

__version__ = "0.1.0"
