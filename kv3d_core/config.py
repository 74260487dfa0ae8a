"""Configuration: the Hydra config tree, a typed schema for the core's keys,
and the overrides the CLI passes.

The tree lives in the repository's ``configs/`` folder (installed as the
package ``kv3d_core.configs``). Every swappable group (``backend``, ``detector``,
``codec``, ``tier``) is in the defaults list of ``config.yaml`` with its default
choice, so ``codec=int8`` picks another option; :func:`normalize_overrides` turns the
older ``+codec=int8`` into that.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from kv3d_core import userconfig
from kv3d_core.analytics.settings import AnalyticsSettings
from kv3d_core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.plugins import PluginManager

PRIMARY = "config"
#: The swappable groups: each in config.yaml's defaults list, each chosen with ``group=option``.
GROUPS = ("backend", "detector", "codec", "tier")
#: Kept for callers of the old name: every swappable group is a plugin group.
PLUGIN_GROUPS = GROUPS


@dataclass
class ServerSchema:
    host: str = "127.0.0.1"
    port: int = 8080
    threads: Optional[int] = None
    api_key: Optional[str] = None
    api_keys: Dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    max_body_mb: float = 16
    default_max_tokens: Optional[int] = None
    cached_tokens: str = "block"
    cached_tokens_block: int = 32
    cors_origins: List[str] = field(default_factory=list)
    drain_s: float = 25
    metrics_public: bool = False


@dataclass
class ModelSchema:
    path: Optional[str] = None
    id: Optional[str] = None


@dataclass
class CacheSchema:
    gpu_hot_mb: float = 256
    ram_warm_mb: float = 1024
    ssd_cold_path: str = "~/.cache/kv3d/cold"
    ssd_cold_mb: float = 4096
    min_snapshot_tokens: int = 32
    hot_idle_s: Optional[float] = None
    hot_idle_watermark: float = 0.5
    share_families: bool = False
    layout: str = "streams"
    stream_ctx: int = 2048
    hot_sessions: Optional[int] = 2
    free_streams: int = 1
    prefix_host_mb: float = 512
    prepare_restores: str = "auto"
    cold_write_through: bool = True
    follow_s: float = 0.5
    publish_idle: bool = True


@dataclass
class SchedulerSchema:
    n_seq_max: int = 40
    max_running: int = 32
    max_waiting: int = 256
    queue_timeout_s: float = 60
    prefill_chunk: int = 256
    step_tokens: Optional[int] = None
    prefill_order: str = "shortest"
    prefill_aging_s: float = 30
    prefill_seqs: Optional[int] = None
    implicit_families: bool = False
    microbatch_tokens: Optional[int] = None
    finish_first: bool = False
    admit_budget_ms: Optional[float] = None


@dataclass
class SafetySchema:
    max_failures: int = 3
    window_s: float = 300
    quality_sample_every: int = 50
    quality_max_kl: float = 0.05
    tier_retry_s: float = 1.0
    tier_retry_max_s: float = 60.0


@dataclass
class CoreSchema:
    server: ServerSchema = field(default_factory=ServerSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    safety: SafetySchema = field(default_factory=SafetySchema)
    analytics: AnalyticsSettings = field(default_factory=AnalyticsSettings)
    safe_mode: bool = False


def config_dir() -> Path:
    """Absolute path of the config tree (source checkout or installed package)."""
    here = Path(__file__).resolve().parent.parent / "configs"
    if (here / f"{PRIMARY}.yaml").is_file():
        return here
    return Path(str(importlib.resources.files("kv3d_core.configs")))


def search_path(plugins: "PluginManager | None" = None) -> list[Path]:
    """Where Hydra looks for config groups: kv3d's own ``configs/`` first, then the config
    directory of every installed plugin (the ``config_dir`` hook), in plugin-name order.
    An option found in two directories comes from the first."""
    if plugins is None:
        from kv3d_core.plugins import make_plugin_manager

        plugins = make_plugin_manager()
    dirs = [config_dir()]
    for d in plugins.config_dirs():
        if d not in dirs:
            dirs.append(d)
    return dirs


def group_options(group: str, dirs: Sequence[Path] | None = None) -> dict[str, Path]:
    """``{option: yaml file}`` of a config group over the search path (first one wins)."""
    out: dict[str, Path] = {}
    for d in (search_path() if dirs is None else dirs):
        sub = Path(d) / group
        if sub.is_dir():
            for f in sorted(sub.glob("*.yaml")):
                out.setdefault(f.stem, f)
    return out


def _hydra_quoted(value: str) -> str:
    """``value`` as a quoted Hydra override string that reads back exactly."""
    v = value.replace("${", "\\${")
    v = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", v)
    v = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, v)
    return "'" + v + "'"


def searchpath_override(dirs: Sequence[Path], overrides: Sequence[str] = (), *,
                        primary: Path | None = None) -> list[str]:
    """``overrides`` plus ``hydra.searchpath`` naming ``dirs``, less the primary config dir,
    which Hydra searches anyway (``primary``; default: kv3d's own, :func:`config_dir`; a tool
    whose primary config lives elsewhere, as ``kv3d bench``'s, passes that one and keeps
    kv3d's in ``dirs``). A ``hydra.searchpath=[...]`` among ``overrides`` keeps its entries, first."""
    primary = Path(primary or config_dir()).resolve()
    # file://PATH, not Path.as_uri(): Hydra takes what follows the scheme as the path, undecoded
    extra = [_hydra_quoted("file://" + str(Path(d).resolve())) for d in dirs if Path(d).resolve() != primary]
    out, user = [], ""
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == "hydra.searchpath":
            user = value.strip()
            continue
        out.append(o)
    if user.startswith("[") and user.endswith("]"):
        user = user[1:-1].strip()
    entries = ([user] if user else []) + extra
    return out + ([f"hydra.searchpath=[{','.join(entries)}]"] if entries else [])


_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def normalize_overrides(overrides: Sequence[str], options: dict[str, set[str]] | None = None) -> list[str]:
    """The swappable groups' overrides in the form Hydra needs now that every one is in
    the defaults list: ``+codec=int8`` (the older form, which appended the group) becomes
    ``codec=int8``. With ``options`` (``{group: option names}``), ``codec.name=int8`` also
    becomes ``codec=int8`` when ``int8`` is an option of the group, so it brings its own
    settings and none of the option it replaces. Everything else passes unchanged."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        bare = key.lstrip("+")
        if sep and key.startswith("+") and not key.startswith("++") and bare in GROUPS:
            o = o[1:]
        elif (sep and options is not None and bare.endswith(".name") and bare[:-5] in GROUPS
              and _OPTION.fullmatch(value.strip()) and value.strip() in options.get(bare[:-5], ())):
            o = f"{bare[:-5]}={value.strip()}"
        out.append(o)
    return out


def _renamed_groups(overrides: Sequence[str]) -> dict[str, set[str]]:
    """Groups whose ``name`` an override sets directly (``codec.name=mine``, for a plugin
    that ships no config group), with the keys the overrides set in them."""
    explicit: dict[str, set[str]] = {}
    for o in overrides:
        key, sep, _ = o.partition("=")
        group, dot, rest = key.lstrip("+~").partition(".")
        if sep and dot and group in GROUPS:
            explicit.setdefault(group, set()).add(rest.split(".")[0])
    return {g: keys for g, keys in explicit.items() if "name" in keys}


def compose(overrides: Sequence[str] = (), *, validate: bool = True, user_config: bool = True,
            plugins: "PluginManager | None" = None) -> DictConfig:
    """The composed configuration, as ``kv3d serve`` would see it.

    With ``user_config``, the user's config file (:mod:`kv3d_core.userconfig`) comes
    between the yaml defaults and ``overrides``: the command line wins over the file.
    The config groups of installed plugins are on the search path (:func:`search_path`;
    ``plugins``: the manager to ask, a fresh one by default). A group whose ``name`` is
    set directly to an implementation with no config option (``codec.name=mine``) keeps
    only the keys the overrides set: never the settings of the option it replaced.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if user_config:
        overrides = [*userconfig.user_overrides(), *overrides]
    dirs = search_path(plugins)
    options = {g: set(group_options(g, dirs)) for g in GROUPS}
    overrides = normalize_overrides(list(overrides), options)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None, job_name="kv3d"):
            cfg = hydra_compose(config_name=PRIMARY, overrides=searchpath_override(dirs, overrides))
    except HydraException as exc:
        hint = ""
        if "Could not find" in str(exc):
            hint = (" (an option that a plugin provides needs the plugin installed: `kv3d plugins` lists them; "
                    "config groups are looked up in " + ", ".join(str(d) for d in dirs) + ")")
        raise ConfigError(f"bad configuration override: {exc}{hint}") from exc
    for group, keys in _renamed_groups(overrides).items():
        node = OmegaConf.to_container(cfg[group], resolve=False)
        assert isinstance(node, dict)
        with open_dict(cfg):
            cfg[group] = {k: v for k, v in node.items() if k in keys}
    return validated(cfg) if validate else cfg


def default_user_config() -> dict[str, dict[str, Any]]:
    """Every key of the user config file's schema (:data:`kv3d_core.userconfig.SCHEMA`)
    with its value from ``configs/config.yaml``: what
    :func:`~kv3d_core.userconfig.ensure_user_config` writes into a new file."""
    cfg = compose([], validate=False, user_config=False)
    out: dict[str, dict[str, Any]] = {}
    for section, keys in userconfig.SCHEMA.items():
        node = OmegaConf.to_container(cfg[section], resolve=True)
        assert isinstance(node, dict)
        out[section] = {key: node.get(key) for key in keys}
    return out


def validated(cfg: DictConfig) -> DictConfig:
    """Check the core's keys against the schema (types, ranges); plugin nodes are
    checked by the plugins themselves."""
    core_keys = {k: cfg[k] for k in ("server", "model", "cache", "scheduler", "safety", "safe_mode") if k in cfg}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(CoreSchema), core_keys)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = (getattr(exc, "msg", None) or str(exc)).split("\n")[0]
        raise ConfigError(f"invalid configuration: {key}: {msg}" if key else f"invalid configuration: {msg}") from exc
    s = typed
    problems = []
    if not 0 <= s.server.port <= 65535:
        problems.append(f"server.port={s.server.port} must be within 0..65535")
    if s.cache.gpu_hot_mb <= 0:
        problems.append("cache.gpu_hot_mb must be > 0")
    if s.cache.ram_warm_mb < 0 or s.cache.ssd_cold_mb < 0:
        problems.append("cache.ram_warm_mb and cache.ssd_cold_mb must be >= 0")
    if s.cache.layout not in ("streams", "unified"):
        problems.append(f"cache.layout must be 'streams' or 'unified', not {s.cache.layout!r}")
    if s.cache.stream_ctx < 256:
        problems.append("cache.stream_ctx must be >= 256 (cells of each sequence's KV stream)")
    if s.cache.hot_sessions is not None and s.cache.hot_sessions < 0:
        problems.append("cache.hot_sessions must be >= 0 (or null: idle sessions stay while streams are free)")
    if s.cache.free_streams < 0 or s.cache.prefix_host_mb < 0:
        problems.append("cache.free_streams and cache.prefix_host_mb must be >= 0")
    if not s.cache.follow_s >= 0:
        problems.append("cache.follow_s must be >= 0 (seconds between reads of a shared tier's feed; 0 = off)")
    if s.cache.prepare_restores not in ("auto", "on", "off"):
        problems.append(f"cache.prepare_restores must be 'auto', 'on' or 'off', not {s.cache.prepare_restores!r}")
    if s.cache.hot_idle_s is not None and s.cache.hot_idle_s < 0:
        problems.append("cache.hot_idle_s must be >= 0 (or null: idle entries stay hot until cells are needed)")
    if not 0 <= s.cache.hot_idle_watermark <= 1:
        problems.append("cache.hot_idle_watermark must be a fraction within 0..1")
    if not 0 < s.safety.tier_retry_s <= s.safety.tier_retry_max_s:
        problems.append("safety.tier_retry_s must be > 0 and <= safety.tier_retry_max_s")
    if not 1 <= s.scheduler.n_seq_max <= 256:
        problems.append(f"scheduler.n_seq_max={s.scheduler.n_seq_max} must be within 1..256 (llama.cpp's limit)")
    if s.scheduler.max_running < 1 or s.scheduler.max_waiting < 0 or s.scheduler.prefill_chunk < 1:
        problems.append("scheduler.max_running and prefill_chunk must be >= 1, max_waiting >= 0")
    if s.scheduler.step_tokens is not None and s.scheduler.step_tokens < 1:
        problems.append("scheduler.step_tokens must be >= 1 (or null: the backend's batch size)")
    if s.scheduler.prefill_order not in ("shortest", "fifo", "fair"):
        problems.append(f"scheduler.prefill_order must be 'shortest', 'fifo' or 'fair', not {s.scheduler.prefill_order!r}")
    if s.scheduler.prefill_aging_s < 0:
        problems.append("scheduler.prefill_aging_s must be >= 0")
    if s.scheduler.prefill_seqs is not None and s.scheduler.prefill_seqs < 0:
        problems.append("scheduler.prefill_seqs must be >= 0 (0: no limit; null: 1 on a CPU, no limit on a GPU)")
    if s.scheduler.admit_budget_ms is not None and s.scheduler.admit_budget_ms < 0:
        problems.append("scheduler.admit_budget_ms must be >= 0 (or null: no bound)")
    if s.scheduler.microbatch_tokens is not None and s.scheduler.microbatch_tokens < 0:
        problems.append("scheduler.microbatch_tokens must be >= 0 (0: off; null: 128 on a GPU, off on a CPU)")
    if s.server.cached_tokens not in ("block", "exact", "off"):
        problems.append(f"server.cached_tokens must be 'block', 'exact' or 'off', not {s.server.cached_tokens!r}")
    if s.server.drain_s < 0:
        problems.append("server.drain_s must be >= 0")
    if s.server.cached_tokens_block < 1:
        problems.append("server.cached_tokens_block must be >= 1")
    for origin in s.server.cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s*]+", origin):
            problems.append(f"server.cors_origins: {origin!r} is not an origin (scheme://host[:port], or \"*\")")
    keys = list(s.server.api_keys.values()) + ([s.server.api_key] if s.server.api_key else [])
    if any(not k for k in keys):
        problems.append("server.api_keys: every tenant needs a non-empty key")
    elif len(set(keys)) != len(keys):
        problems.append("server.api_keys: a key may belong to one tenant only (and not repeat server.api_key)")
    if s.server.api_key and "default" in s.server.api_keys:
        problems.append("server.api_key is the tenant 'default': do not name another tenant 'default' in server.api_keys")
    a = s.analytics
    if a.preview_words < 1 or not 1 <= a.top_families <= 1000:
        problems.append("analytics.preview_words must be >= 1 and analytics.top_families within 1..1000")
    if a.window_s <= 0 or a.refresh_s <= 0 or a.gpu_hour_price < 0:
        problems.append("analytics.window_s and analytics.refresh_s must be > 0, analytics.gpu_hour_price >= 0")
    if not 0 < a.mrc_sample_rate <= 1 or a.mrc_max_objects < 16:
        problems.append("analytics.mrc_sample_rate must be within (0, 1] and analytics.mrc_max_objects >= 16")
    if problems:
        raise ConfigError("; ".join(problems))
    for name in GROUPS:
        node = cfg.get(name)
        if node is None or "name" not in node:
            raise ConfigError(f"the {name!r} config node needs a 'name' (the plugin to use)")
    out = OmegaConf.merge(cfg, typed)
    assert isinstance(out, DictConfig)
    return out
