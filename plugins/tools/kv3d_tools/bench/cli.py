"""``kv3d bench [-m] [OVERRIDES...]``: benchmark kv3d against llama-cpp-python's
own OpenAI server on a seeded chat workload.

A thin Hydra application over ``bench.yaml`` (its primary config, in kv3d-tools'
``conf/``), with the core's ``configs/`` and every plugin's config groups on Hydra's
search path: its defaults list pulls in the serve configuration, ``config.yaml``, and
with it every config group. ``hydra.main`` is invoked with the arguments given, so every
Hydra flag works -- ``-m``/``--multirun`` sweeps (``kv3d bench -m codec=none,int8
tier=ram,ssd`` runs every combination, then writes one combined summary),
``--cfg job`` prints the composed configuration. Swappable groups (``codec``,
``tier``, ``detector``) are chosen as for ``kv3d serve`` (``+codec=int8`` works too).

Single runs write to ``${out_dir}/<timestamp>/``; sweeps to
``${out_dir}/<timestamp>-multirun/<job num>/`` plus ``summary.md``/``summary.json``
in the sweep directory. A run that fails writes ``error.json`` in its directory
instead of a report (a sweep goes on with the next job); the command then
returns 1. Returns 0 when every run wrote its report.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from kv3d_core.config import GROUPS, group_options, normalize_overrides, search_path, searchpath_override
from kv3d_core.errors import Kv3dError
from kv3d_tools.plugin import CONF_DIR

CONFIG_NAME = "bench"
log = logging.getLogger("kv3d.bench")
_failures: list[str] = []     # output dirs of runs that failed, in this process


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kv3d_tools.bench.run import run_bench
    from kv3d_tools.bench.systems import BenchError

    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_bench(cfg, out, overrides, quality_cache_dir=Path(hc.sweep.dir) if multirun else None)
    except Exception as exc:   # recorded so a sweep goes on and its summary lists the failure
        if isinstance(exc, (BenchError, Kv3dError)):
            log.error("%s", exc)
        else:
            log.exception("bench run failed")
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:4000],
                                                    "overrides": overrides}, indent=2))
        _failures.append(str(out))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


#: what `kv3d bench` imports beyond the server's own dependencies (kv3d-tools' own; the `bench` extra)
BENCH_MODULES = ("httpx", "openai", "matplotlib", "tqdm", "psutil")


def missing_extras() -> list[str]:
    from importlib.util import find_spec

    return [m for m in BENCH_MODULES if find_spec(m) is None]


def _list_groups_in_help(options: dict[str, set[str]]) -> None:
    """``${kv3d_bench_groups:}`` of bench.yaml's help template: each group's options over the
    search path, as Hydra lists the groups of its config path."""
    from omegaconf import OmegaConf

    text = "\n".join(f"{g}: {', '.join(sorted(opts))}" for g, opts in sorted(options.items()) if opts)
    OmegaConf.register_new_resolver("kv3d_bench_groups", lambda: text, replace=True)


def main(args: list[str]) -> int:
    import hydra

    missing = missing_extras()
    if missing:
        print(f"kv3d bench: error: it needs {', '.join(missing)}, from kv3d's `bench` extra: "
              "pip install 'kv3d[bench]' (or: scripts/setup.sh test)", file=sys.stderr)
        return 2

    # bench.yaml is the primary config, in CONF_DIR (Hydra looks for a primary config only there, never
    # on hydra.searchpath); the core's configs/ (config.yaml, which bench.yaml's defaults pull in, and
    # the built-in options) and the plugins' config groups (codec=int8, tier=ssd...) are on the search path
    dirs = search_path()
    options = {g: set(group_options(g, dirs)) for g in GROUPS}
    _list_groups_in_help(options)
    argv = [a if a.startswith("-") else normalize_overrides([a], options)[0] for a in args]
    # hydra.searchpath joins the other overrides (argparse takes them as one run of positionals)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    searchpath = searchpath_override(dirs, overrides, primary=CONF_DIR)[-1:]
    argv = [a for a in argv if not a.lstrip("+").startswith("hydra.searchpath=")]
    at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    argv[at:at] = searchpath
    app = hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base=None)(_task)
    saved = sys.argv
    sys.argv = ["kv3d-bench", *argv]
    _failures.clear()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped on the way out
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:
        print("kv3d bench: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:       # hydra exits on a bad override or a failed job
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except ValueError as exc:       # conflicting hydra flags (e.g. --cfg with -m)
        print(f"kv3d bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
        signal.signal(signal.SIGTERM, previous)
    if _failures:
        print(f"kv3d bench: {len(_failures)} run(s) failed: see error.json in {', '.join(_failures)}", file=sys.stderr)
        return 1
    return 0
