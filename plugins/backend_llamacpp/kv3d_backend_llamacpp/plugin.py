"""Entry point of the ``backend_llamacpp`` plugin: registers the ``llamacpp`` backend, its
settings and its config group (``conf/backend/llamacpp.yaml``, the default backend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kv3d_core import hookimpl


@dataclass
class LlamaCppSettings:
    """The ``backend`` node of ``backend=llamacpp`` (documented in
    ``conf/backend/llamacpp.yaml``). The core adds the model, cache and scheduler values
    (``model_path``, ``hot_mb``, ``n_seq_max``...) itself."""

    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: Any = "auto"       # "auto" or a layer count (-1: all)
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    swa_full: bool = False
    state_staging: str = "auto"
    n_ctx: Optional[int] = None      # unified layout: cells of the context; null = from cache.gpu_hot_mb


@hookimpl
def register_backends(register):
    from kv3d_backend_llamacpp.backend import LlamaCppBackend

    register("llamacpp", LlamaCppBackend, settings=LlamaCppSettings)


@hookimpl
def config_dir():
    return str(Path(__file__).parent / "conf")
