"""Entry point of the ``codec_block`` plugin: registers the ``block`` (4-bit) delta codec,
its settings and its config group (``conf/codec/block.yaml``: ``kv3d serve codec=block``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kv3d_core import hookimpl


@dataclass
class BlockSettings:
    """The ``codec`` node of ``codec=block`` (documented in ``conf/codec/block.yaml``)."""

    group_size: int = 32
    offset: bool = True
    zstd_level: int = 0
    threads: int = 1


@hookimpl
def register_codecs(register):
    from kv3d_codec_block.codec import BlockCodec

    register("block", BlockCodec, settings=BlockSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
