"""Plugin manager factory and the registry of implementations.

Nothing is loaded at import time. :func:`make_plugin_manager` builds a fresh
pluggy manager, registers the built-in plugins (the same way third-party ones
are registered), then loads the ``kv3d`` entry points once. A plugin whose
entry point fails to import is recorded as broken (``kv3d plugins`` shows the
error); asking for an implementation that is missing or broken raises
:class:`~kv3d_core.errors.PluginError` -- kv3d never runs without a plugin the
configuration asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import inspect
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pluggy

from kv3d_core import hookspecs
from kv3d_core.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "kv3d"

#: Built-in plugin modules, registered on every manager.
BUILTIN_PLUGINS = (
    "kv3d_core.prefix.detectors",
    "kv3d_core.kv.codec_none",
    "kv3d_core.tiers.ram",
)

_HOOK_OF_KIND = {
    "backend": "register_backends",
    "detector": "register_detectors",
    "codec": "register_codecs",
    "tier": "register_tiers",
}

#: The contract class of each kind, ``(module, class)``: what a factory must return.
CONTRACTS = {
    "backend": ("kv3d_core.contracts.backend", "ExecutionBackend"),
    "detector": ("kv3d_core.contracts.detector", "PrefixDetector"),
    "codec": ("kv3d_core.contracts.codec", "DeltaCodec"),
    "tier": ("kv3d_core.contracts.tier", "StorageTier"),
}


def plugin_settings(node: Any) -> tuple[str, dict[str, Any]]:
    """``(name, settings)`` of a plugin's config node (a ``DictConfig`` or a dict):
    every key but ``name``."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    assert isinstance(data, dict)
    name = str(data.pop("name"))
    return name, data


def contract_of(kind: str) -> type:
    """The contract class implementations of ``kind`` must be instances of."""
    module, cls = CONTRACTS[kind]
    return getattr(importlib.import_module(module), cls)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of the plugin's ``@hookimpl`` functions that match no hook specification (a
    misspelt hook would otherwise never be called)."""
    return sorted(hc.name for hc in (pm.get_hookcallers(plugin) or []) if hc.spec is None)


@dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin module came from."""

    plugin: str
    distribution: str
    version: str
    error: str | None = None


@dataclass(frozen=True)
class Implementation:
    kind: str
    name: str
    factory: Callable[..., Any]
    source: PluginSource
    settings: type | None = None
    """The plugin's settings schema (a dataclass), when it declared one."""

    def setting_names(self) -> list[str] | None:
        """The keys its config node may hold (``name`` aside); None when any is taken
        (a factory with ``**kwargs`` and no schema)."""
        if self.settings is not None:
            return [f.name for f in dataclasses.fields(self.settings)]
        try:
            params = inspect.signature(self.factory).parameters.values()
        except (TypeError, ValueError):      # a builtin or C callable: nothing to check against
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def check_settings(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` (a config node's keys, ``name`` aside) checked against the plugin's
        settings: an unknown key is a :class:`~kv3d_core.errors.ConfigError` naming it and
        the settings there are; with a schema, values are converted to its field types
        (a value that cannot be is an error naming the key) and missing ones take its
        defaults."""
        known = self.setting_names()
        what = f"{self.kind} {self.name!r}"
        if known is not None:
            unknown = sorted(set(given) - set(known))
            if unknown:
                keys = ", ".join(f"{self.kind}.{k}" for k in unknown)
                raise ConfigError(f"{what} has no setting {keys} (its settings: {', '.join(known) or 'none'})")
        if self.settings is None:
            return dict(given)
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            typed = OmegaConf.merge(OmegaConf.structured(self.settings), given)
            out = OmegaConf.to_container(typed, resolve=True)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "key", None) or getattr(exc, "full_key", None)
            msg = (getattr(exc, "msg", None) or str(exc)).split("\n")[0]
            where = f"{self.kind}.{key}: " if key else ""
            raise ConfigError(f"{what}: invalid setting {where}{msg}") from exc
        assert isinstance(out, dict)
        return out


@dataclass(frozen=True)
class Command:
    """A ``kv3d`` subcommand a plugin registered (``register_commands``)."""

    name: str
    run: Callable[[list[str]], Any]
    help: str
    source: PluginSource


@dataclass(frozen=True)
class DoctorCheck:
    """A check a plugin registered for ``kv3d doctor`` (``register_doctor_checks``)."""

    name: str
    check: Callable[[Any], Any]
    source: PluginSource


#: kv3d's own commands: a plugin cannot register these names.
BUILTIN_COMMANDS = ("serve", "config", "doctor", "plugins", "help")


@dataclass
class PluginManager:
    """A pluggy manager plus what it loaded. Build one with :func:`make_plugin_manager`."""

    pm: pluggy.PluginManager
    sources: dict[str, PluginSource] = field(default_factory=dict)
    broken: list[PluginSource] = field(default_factory=list)
    broken_tracebacks: dict[str, str] = field(default_factory=dict)
    _impls: dict[tuple[str, str], Implementation] | None = None
    _commands: dict[str, Command] | None = None
    _checks: list[DoctorCheck] | None = None

    # -- discovery -------------------------------------------------------------
    def implementations(self) -> dict[tuple[str, str], Implementation]:
        if self._impls is None:
            impls: dict[tuple[str, str], Implementation] = {}
            for kind, hook_name in _HOOK_OF_KIND.items():
                hook = getattr(self.pm.hook, hook_name)
                for hook_impl in hook.get_hookimpls():
                    plugin_name = self.pm.get_name(hook_impl.plugin) or "?"
                    source = self.sources.get(plugin_name, PluginSource(plugin_name, "?", "?"))

                    def register(name: str, factory: Callable[..., Any], *, settings: type | None = None,
                                 _kind=kind, _src=source) -> None:
                        if not isinstance(name, str) or not name:
                            raise PluginError(f"plugin {_src.plugin!r} registered a {_kind} with an invalid name {name!r}")
                        if not callable(factory):
                            raise PluginError(f"plugin {_src.plugin!r} registered {_kind} {name!r} with a factory "
                                              f"that is not callable: {factory!r}")
                        if settings is not None and not (isinstance(settings, type)
                                                         and dataclasses.is_dataclass(settings)):
                            raise PluginError(f"plugin {_src.plugin!r} registered {_kind} {name!r} with settings="
                                              f"{settings!r}: the settings schema must be a dataclass")
                        key = (_kind, name)
                        if key in impls and impls[key].factory is not factory:
                            other = impls[key].source
                            raise PluginError(
                                f"{_kind} {name!r} is registered twice: by {other.plugin!r} "
                                f"({other.distribution}) and by {_src.plugin!r} ({_src.distribution}); "
                                "uninstall one of them"
                            )
                        impls[key] = Implementation(_kind, name, factory, _src, settings)

                    try:
                        hook_impl.function(register=register)
                    except PluginError:
                        raise
                    except Exception as exc:  # one broken plugin must not hide the others
                        err = f"{type(exc).__name__} in {hook_name}: {exc}"
                        self.broken.append(PluginSource(source.plugin, source.distribution, source.version, err))
                        self.broken_tracebacks[source.plugin] = traceback.format_exc()
            self._impls = impls
        return self._impls

    def _call_registering(self, hook_name: str, register_for: Callable[[PluginSource], Callable[..., None]]) -> None:
        """Call every implementation of a ``register_*`` hook with its own ``register``; a
        plugin whose hook raises (but for a PluginError) is recorded as broken."""
        for hook_impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin_name = self.pm.get_name(hook_impl.plugin) or "?"
            source = self.sources.get(plugin_name, PluginSource(plugin_name, "?", "?"))
            try:
                hook_impl.function(register=register_for(source))
            except PluginError:
                raise
            except Exception as exc:
                self.broken.append(PluginSource(source.plugin, source.distribution, source.version,
                                                f"{type(exc).__name__} in {hook_name}: {exc}"))
                self.broken_tracebacks[source.plugin] = traceback.format_exc()

    def commands(self) -> dict[str, Command]:
        """The ``kv3d`` subcommands plugins registered, by name."""
        if self._commands is None:
            commands: dict[str, Command] = {}

            def register_for(src: PluginSource) -> Callable[..., None]:
                def register(name: str, run: Callable[[list[str]], Any], help: str = "") -> None:
                    if not isinstance(name, str) or not name or name.startswith("-") or any(c.isspace() for c in name):
                        raise PluginError(f"plugin {src.plugin!r} registered a command with an invalid name {name!r}")
                    if name in BUILTIN_COMMANDS:
                        raise PluginError(f"plugin {src.plugin!r} ({src.distribution}) registered the command "
                                          f"{name!r}, which is kv3d's own; rename it")
                    if not callable(run):
                        raise PluginError(f"plugin {src.plugin!r} registered command {name!r} with {run!r}, "
                                          "which is not callable")
                    if name in commands and commands[name].run is not run:
                        other = commands[name].source
                        raise PluginError(f"command {name!r} is registered twice: by {other.plugin!r} "
                                          f"({other.distribution}) and by {src.plugin!r} ({src.distribution}); "
                                          "uninstall one of them")
                    commands[name] = Command(name, run, str(help or ""), src)
                return register

            self._call_registering("register_commands", register_for)
            self._commands = commands
        return self._commands

    def doctor_checks(self) -> list[DoctorCheck]:
        """The checks plugins registered for ``kv3d doctor``, in registration order."""
        if self._checks is None:
            checks: list[DoctorCheck] = []

            def register_for(src: PluginSource) -> Callable[..., None]:
                def register(name: str, check: Callable[[Any], Any]) -> None:
                    if not isinstance(name, str) or not name or not callable(check):
                        raise PluginError(f"plugin {src.plugin!r} registered an invalid doctor check "
                                          f"{name!r}: {check!r}")
                    checks.append(DoctorCheck(name, check, src))
                return register

            self._call_registering("register_doctor_checks", register_for)
            self._checks = checks
        return self._checks

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self.implementations() if k == kind)

    def get(self, kind: str, name: str) -> Implementation:
        if kind not in _HOOK_OF_KIND:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds are {', '.join(_HOOK_OF_KIND)}")
        impl = self.implementations().get((kind, name))
        if impl is not None:
            return impl
        hint = ""
        broken = [b for b in self.broken if name.replace("-", "_") in b.plugin.replace("-", "_")]
        if broken:
            hint = f" The plugin {broken[0].plugin!r} is installed but failed to load: {broken[0].error}"
        elif kind in ("codec", "tier", "backend"):
            hint = (f" If it ships with kv3d, install it with: pip install ./plugins/{kind}_{name}"
                    if kind != "backend" else f" Install it with: pip install ./plugins/backend_{name}")
        installed = ", ".join(self.names(kind)) or "none"
        raise PluginError(f"{kind} plugin {name!r} is not installed (installed {kind}s: {installed}).{hint}")

    def create(self, kind: str, name: str, **settings: Any) -> Any:
        """Instantiate implementation ``name`` of ``kind`` with keyword ``settings``; what
        the factory returns must be an instance of the kind's contract class
        (:data:`CONTRACTS`), else :class:`~kv3d_core.errors.PluginError`."""
        impl = self.get(kind, name)
        try:
            obj = impl.factory(**settings)
        except PluginError:
            raise
        except TypeError as exc:
            raise PluginError(f"{kind} plugin {name!r} rejected its settings {sorted(settings)}: {exc}") from exc
        contract = contract_of(kind)
        if not isinstance(obj, contract):
            if kind == "backend" and hasattr(obj, "close"):
                try:
                    obj.close()             # a backend holds a model: do not leak it
                except Exception:
                    pass
            raise PluginError(
                f"{kind} plugin {name!r} ({impl.source.distribution} {impl.source.version}, {impl.source.plugin}) "
                f"returned {type(obj).__module__}.{type(obj).__qualname__}, which is not a "
                f"{contract.__module__}.{contract.__qualname__}: its factory must return an instance of a "
                "subclass of the contract class")
        return obj

    def settings(self, kind: str, node: Any) -> tuple[str, dict[str, Any]]:
        """``(name, settings)`` of a plugin's config node (``cfg.codec``...), the settings
        checked against what implementation ``name`` declares
        (:meth:`Implementation.check_settings`)."""
        name, given = plugin_settings(node)
        return name, self.get(kind, name).check_settings(given)

    def configure(self, kind: str, node: Any, **core: Any) -> Any:
        """The implementation a config node names, made with the node's checked settings
        plus ``core`` (values the core computes, e.g. a backend's ``n_seq_max``)."""
        name, settings = self.settings(kind, node)
        clash = sorted(set(settings) & set(core))
        if clash:
            raise ConfigError(f"{kind}.{clash[0]} is set by kv3d itself; remove it from the {kind} config")
        return self.create(kind, name, **settings, **core)

    def config_dirs(self) -> list[Path]:
        """The config directories installed plugins ship (the ``config_dir`` hook), in
        plugin-name order; a plugin whose hook fails or names no directory is recorded as
        broken (``kv3d plugins`` shows why) and left out."""
        out: list[tuple[str, Path]] = []
        for hook_impl in self.pm.hook.config_dir.get_hookimpls():
            plugin_name = self.pm.get_name(hook_impl.plugin) or "?"
            source = self.sources.get(plugin_name, PluginSource(plugin_name, "?", "?"))
            try:
                got = hook_impl.function()
                if got is None:
                    continue
                path = Path(got)
                if not path.is_dir():
                    raise FileNotFoundError(f"config_dir() returned {str(path)!r}, which is not a directory")
            except Exception as exc:
                if not any(b.plugin == source.plugin for b in self.broken):
                    self.broken.append(PluginSource(source.plugin, source.distribution, source.version,
                                                    f"{type(exc).__name__} in config_dir: {exc}"))
                    self.broken_tracebacks[source.plugin] = traceback.format_exc()
                continue
            out.append((plugin_name, path.resolve()))
        return [p for _, p in sorted(out, key=lambda x: x[0])]

    def describe(self) -> list[dict[str, Any]]:
        """One record per implementation, plugin command and doctor check (and per broken
        plugin), for ``kv3d plugins``."""
        rows = [
            {
                "name": impl.name,
                "kind": impl.kind,
                "version": impl.source.version,
                "distribution": impl.source.distribution,
                "plugin": impl.source.plugin,
                "settings": impl.setting_names(),
            }
            for impl in sorted(self.implementations().values(), key=lambda i: (i.kind, i.name))
        ]
        rows += [{"name": c.name, "kind": "command", "version": c.source.version, "distribution": c.source.distribution,
                  "plugin": c.source.plugin, "help": c.help} for c in sorted(self.commands().values(),
                                                                            key=lambda c: c.name)]
        rows += [{"name": c.name, "kind": "doctor_check", "version": c.source.version,
                  "distribution": c.source.distribution, "plugin": c.source.plugin} for c in self.doctor_checks()]
        rows += [
            {"name": b.plugin, "kind": "broken", "version": b.version,
             "distribution": b.distribution, "plugin": b.plugin, "error": b.error}
            for b in self.broken
        ]
        return rows


def _core_source(plugin: str) -> PluginSource:
    try:
        version = md.version("kv3d")
    except md.PackageNotFoundError:  # running from a source tree
        from kv3d_core import __version__ as version
    return PluginSource(plugin, "kv3d", version)


def make_plugin_manager(*, load_entry_points: bool = True, builtins: bool = True,
                        extra: Iterable[tuple[str, object]] = ()) -> PluginManager:
    """A fresh plugin manager.

    ``extra`` registers additional ``(name, plugin object)`` pairs (tests, embedding
    applications). Entry points of the ``kv3d`` group are loaded once, here.

    Every plugin's ``@hookimpl`` functions must match a hook specification: an entry
    point with a misspelt hook is recorded as broken (and left out: ``kv3d plugins`` says
    which hook), a built-in or ``extra`` plugin with one raises
    :class:`~kv3d_core.errors.PluginError`; pluggy's ``check_pending()`` then confirms
    nothing unknown is left.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)

    def register_strict(plugin: object, name: str) -> None:
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} does not fit kv3d's hooks: {exc}") from exc
        unknown = _unknown_hooks(pm, plugin)
        if unknown:
            pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} implements {', '.join(unknown)}, which kv3d has no hook for "
                              f"(a misspelt hook name?); the hooks are: {', '.join(_hook_names())}")

    if builtins:
        for module_name in BUILTIN_PLUGINS:
            register_strict(importlib.import_module(module_name), module_name)
            manager.sources[module_name] = _core_source(module_name)
    if load_entry_points:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            source = PluginSource(ep.name, dist.name if dist else "?", dist.version if dist else "?")
            try:
                plugin = ep.load()
                register_strict(plugin, ep.name)
            except Exception as exc:  # a broken plugin is reported, not fatal until asked for
                err = f"{type(exc).__name__}: {exc}"
                manager.broken.append(PluginSource(ep.name, source.distribution, source.version, err))
                manager.broken_tracebacks[ep.name] = traceback.format_exc()
                continue
            manager.sources[ep.name] = source
    for name, plugin in extra:
        register_strict(plugin, name)
        manager.sources[name] = PluginSource(name, "(registered in code)", "-")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:       # not reached: register_strict refuses them first
        raise PluginError(str(exc)) from exc
    return manager


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "kv3d_spec"))
