"""Entry point of the ``codec_int8`` plugin: registers the ``int8`` delta codec, its
settings and its config group (``conf/codec/int8.yaml``: ``kv3d serve codec=int8``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kv3d_core import hookimpl


@dataclass
class Int8Settings:
    """The ``codec`` node of ``codec=int8`` (documented in ``conf/codec/int8.yaml``)."""

    zstd_level: int = 3
    threads: int = 1
    decode_threads: Optional[int] = None
    kernel: str = "auto"


@hookimpl
def register_codecs(register):
    from kv3d_codec_int8.codec import Int8Codec

    register("int8", Int8Codec, settings=Int8Settings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
