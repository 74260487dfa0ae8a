"""The pluggy hook specifications of kv3d.

A plugin is a module (or object) with functions marked ``@kv3d_core.hookimpl``.
Each hook receives a ``register`` callback; the plugin calls it once per
implementation it provides::

    from kv3d_core import hookimpl

    @hookimpl
    def register_codecs(register):
        register("int8", Int8Codec)

``register(name, factory)`` takes a unique name within the kind and a factory:
a callable taking keyword settings from the Hydra config node of that kind and
returning an object that fulfils the kind's contract (see ``kv3d_core.contracts``).
Factories are called lazily, only for the implementation a configuration selects.

Third-party plugins are found through the ``kv3d`` entry-point group::

    [project.entry-points.kv3d]
    my_codec = "my_package.plugin"
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "kv3d"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., object]], None]


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
