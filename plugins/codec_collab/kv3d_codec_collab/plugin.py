"""Entry point of the ``codec_collab`` plugin: registers the ``collab`` block codec, its
settings and its config group (``conf/codec/collab.yaml``: ``kv3d serve codec=collab``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kv3d_core import hookimpl


@dataclass
class CollabSettings:
    """The ``codec`` node of ``codec=collab`` (documented in ``conf/codec/collab.yaml``)."""

    block_tokens: int = 64
    inner: str = "int8"
    zstd_level: int = 3
    decode_threads: Optional[int] = None


@hookimpl
def register_codecs(register):
    from kv3d_codec_collab.codec import CollabCodec

    register("collab", CollabCodec, settings=CollabSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
