"""Entry point of the ``tools`` plugin (kv3d-tools): the commands ``kv3d bench``,
``kv3d quality``, ``kv3d synth-model`` and ``kv3d scale-sim``, and the doctor's ``llama-server`` row.

No ``config_dir`` hook: ``conf/`` holds no config group, only ``bench.yaml``, the bench's
primary config, which :mod:`kv3d_tools.bench.cli` hands to Hydra as its config path (the
core's ``configs/`` and the plugins' groups then come from the search path).

Every ``kv3d`` command loads this module, so it imports nothing heavy: each command's
module is imported when that command runs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from kv3d_core import hookimpl

#: ``bench.yaml``'s directory: ``kv3d bench``'s Hydra config path
CONF_DIR = Path(__file__).resolve().parent / "conf"

#: command -> (module with ``main(args) -> int``, the one-line help of ``kv3d --help``)
COMMANDS = {
    "bench": ("kv3d_tools.bench.cli", "benchmark kv3d against llama.cpp's llama-server (docs/BENCHMARKS.md)"),
    "quality": ("kv3d_tools.quality", "codec quality harness: KL, top-1 agreement, perplexity change after "
                                      "spill/restore"),
    "synth-model": ("kv3d_tools.synth_model", "write a synthetic GGUF of a named shape (GPU benchmarks)"),
    "scale-sim": ("kv3d_tools.scale_sim", "capacity model of N replicas with a shared tier behind the router "
                                          "(docs/SCALING.md)"),
}


def _lazy(module: str) -> Callable[[Sequence[str]], int]:
    """``module.main(args)``, the module imported only when the command runs."""

    def run(args: Sequence[str]) -> int:
        return int(importlib.import_module(module).main(list(args)) or 0)

    return run


@hookimpl
def register_commands(register):
    for name, (module, help_) in COMMANDS.items():
        register(name, _lazy(module), help=help_)


def check_llama_server(cfg) -> tuple[str, ...]:
    """llama.cpp's llama-server, the benchmark's baseline (not needed to serve)."""
    from kv3d_tools.bench.llama_server import find_binary

    path, why = find_binary()
    if path is None:
        return "INFO", f"not built: {why}", "scripts/build_llama.sh (only `kv3d bench` needs it)"
    info = Path(path).parent / "BUILD-INFO"
    lines = info.read_text().splitlines() if info.is_file() else []
    facts = dict(line.split("=", 1) for line in lines if "=" in line)
    version = next((line for line in lines if line.startswith("version:")), "")
    return "OK", f"{path} ({facts.get('variant', '?')} build{', ' + version if version else ''})"


@hookimpl
def register_doctor_checks(register):
    register("llama-server", check_llama_server)
