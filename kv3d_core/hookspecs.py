"""The pluggy hook specifications of kv3d.

A plugin is a module (or object) with functions marked ``@kv3d_core.hookimpl``.
The ``register_*`` hooks receive a ``register`` callback; the plugin calls it once
per implementation it provides::

    from kv3d_core import hookimpl

    @hookimpl
    def register_codecs(register):
        register("int8", Int8Codec, settings=Int8Settings)

``register(name, factory, *, settings=None)`` takes a unique name within the kind, a
factory -- a callable taking keyword settings and returning an object that fulfils
the kind's contract (see ``kv3d_core.contracts``) -- and optionally the plugin's
settings schema: a dataclass whose fields are the keys of its config node. The core
checks the node against it before calling the factory (types converted, an unknown
key an error naming it). Without a schema, the factory's keyword parameters are the
settings (a ``**kwargs`` factory takes any). Factories are called lazily, only for
the implementation a configuration selects.

:func:`register_commands` adds ``kv3d`` subcommands and :func:`register_doctor_checks`
rows of ``kv3d doctor``; both take the same ``register`` callback with their own
arguments (see each hook).

:func:`config_dir` ships the plugin's Hydra config groups (``codec/mine.yaml``) inside
its package; the core adds every such directory to Hydra's search path, so
``kv3d serve codec=mine`` works once the plugin is installed.

Third-party plugins are found through the ``kv3d`` entry-point group::

    [project.entry-points.kv3d]
    my_codec = "my_package.plugin"

Checks at load (:func:`kv3d_core.plugins.make_plugin_manager`): a function marked
``@hookimpl`` whose name is no hook below (a misspelt ``register_codec``) makes its plugin
broken -- listed with the reason by ``kv3d plugins``, never silently ignored -- and
pluggy's ``check_pending()`` confirms none is left; an object a factory returns must be an
instance of its kind's contract class (``ExecutionBackend``, ``PrefixDetector``,
``DeltaCodec``, ``StorageTier``), else :class:`~kv3d_core.errors.PluginError`.
"""

from __future__ import annotations

import os
from typing import Callable

import pluggy

PROJECT = "kv3d"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: ``register(name, factory, *, settings=None)``
Register = Callable[..., None]


@hookspec
def register_backends(register: Register) -> None:
    """Register execution backends (contract: :class:`kv3d_core.contracts.backend.ExecutionBackend`)."""


@hookspec
def register_detectors(register: Register) -> None:
    """Register prefix detectors (contract: :class:`kv3d_core.contracts.detector.PrefixDetector`)."""


@hookspec
def register_codecs(register: Register) -> None:
    """Register delta codecs (contract: :class:`kv3d_core.contracts.codec.DeltaCodec`)."""


@hookspec
def register_tiers(register: Register) -> None:
    """Register storage tiers (contract: :class:`kv3d_core.contracts.tier.StorageTier`)."""


@hookspec
def config_dir() -> "str | os.PathLike[str] | None":
    """The directory holding this plugin's Hydra config groups, or None.

    Laid out like kv3d's own ``configs/``: one folder per group, one yaml file per
    option, e.g. ``<dir>/codec/mine.yaml`` holding ``name: mine`` and the codec's
    settings with their defaults. kv3d adds every installed plugin's directory to
    Hydra's search path (after its own ``configs/``), so ``codec=mine`` selects it.
    Typically ``str(Path(__file__).parent / "conf")``; ship the files as package data."""


@hookspec
def register_commands(register: Register) -> None:
    """Register ``kv3d`` subcommands (as simonw/llm's ``register_commands``).

    ``register(name, run, help="")``: ``kv3d NAME ARGS...`` calls ``run(args)`` with the
    arguments after the name (a ``list[str]``; parse them as you like) and exits with its
    return value (an int; None is 0). ``help`` is the one-line summary ``kv3d --help``
    shows. kv3d's own commands (``serve``, ``config``...) cannot be replaced; a name two
    plugins register is an error. Raise :class:`~kv3d_core.errors.Kv3dError` for an error
    the user can fix: kv3d prints its message and exits 1. Import heavy modules inside
    ``run``, not at the top of the plugin module: every ``kv3d`` command loads the
    entry points."""


@hookspec
def register_doctor_checks(register: Register) -> None:
    """Register checks ``kv3d doctor`` runs after its own.

    ``register(name, check)``: ``check(cfg)`` gets the composed configuration (an
    OmegaConf ``DictConfig``, or None when it did not compose) and returns one result or a
    list of them; a result is a :class:`kv3d_core.doctor.Check` or a tuple
    ``(status, detail)`` / ``(status, detail, fix)`` with status ``"OK"``, ``"INFO"``,
    ``"WARN"`` or ``"FAIL"`` (FAIL: ``kv3d serve`` would not work; the doctor then exits
    1). A tuple's row is named ``name``. A check must not change the machine; one that
    raises becomes a WARN row naming the plugin."""
