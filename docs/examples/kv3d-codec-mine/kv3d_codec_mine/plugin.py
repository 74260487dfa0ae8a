"""Entry point of kv3d-codec-mine: registers the codec, its settings and its config group."""

from dataclasses import dataclass
from pathlib import Path

from kv3d_core import hookimpl


@dataclass
class MineSettings:
    """The keys of the ``codec`` node when ``codec=mine`` (see conf/codec/mine.yaml)."""

    level: int = 6


@hookimpl
def register_codecs(register):
    from kv3d_codec_mine.codec import MineCodec      # imported only when kv3d asks for codecs

    register("mine", MineCodec, settings=MineSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
