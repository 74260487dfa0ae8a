"""Hydra composition as `kv3d serve` sees it."""

from __future__ import annotations

import pytest

from pathlib import Path

from kv3d_core.config import GROUPS, compose, config_dir, group_options, normalize_overrides, search_path, \
    searchpath_override
from kv3d_core.errors import ConfigError


def test_defaults():
    cfg = compose()
    assert cfg.backend.name == "llamacpp"
    assert cfg.detector.name == "exact" and cfg.codec.name == "none" and cfg.tier.name == "ram"
    assert cfg.server.port == 8080 and cfg.model.path is None
    for key in ("gpu_hot_mb", "ram_warm_mb", "ssd_cold_path"):
        assert key in cfg.cache


def test_every_swappable_group_is_in_the_defaults_list():
    """backend, detector, codec and tier each have a default choice in config.yaml's defaults
    list, and config.yaml holds no copy of a default option's body."""
    import yaml

    primary = yaml.safe_load((config_dir() / "config.yaml").read_text())
    chosen = {k: v for d in primary["defaults"] if isinstance(d, dict) for k, v in d.items()}
    assert chosen == {"backend": "llamacpp", "detector": "exact", "codec": "none", "tier": "ram"}
    assert not set(primary) & set(chosen), "a default group's body is copied into config.yaml"


def test_group_without_plus():
    cfg = compose(["codec=none", "tier=ram", "detector=radix"])
    assert cfg.codec.name == "none" and cfg.tier.name == "ram"
    assert cfg.detector.name == "radix" and cfg.detector.min_match_tokens == 16


def test_plus_group_still_works():
    """The older `+group=option` form (README, scripts, users' notes) is normalised."""
    assert normalize_overrides(["+codec=int8", "codec.zstd_level=3", "server.port=1", "+server.api_keys={a: b}"]) == [
        "codec=int8", "codec.zstd_level=3", "server.port=1", "+server.api_keys={a: b}"]
    cfg = compose(["+codec=none", "+tier=ram", "+detector=radix"])
    assert cfg.codec.name == "none" and cfg.detector.name == "radix" and cfg.detector.min_match_tokens == 16


def test_an_option_replaces_the_default_body():
    """Choosing another option brings none of the default option's settings."""
    assert "min_match_tokens" not in compose(["detector=exact"]).detector
    assert "min_match_tokens" not in compose(["detector=radix", "detector=exact"]).detector


def test_every_group_option_composes():
    for group in GROUPS:
        options = group_options(group)
        assert options, group
        for name, f in options.items():
            for form in (f"{group}={name}", f"+{group}={name}"):
                cfg = compose([form])
                assert cfg[group].name == name, (f, form)


def test_plugins_ship_their_config_groups():
    """The in-tree plugins' options come from their packages (the config_dir hook); the
    built-in ones stay in configs/."""
    dirs = search_path()
    assert dirs[0] == config_dir()
    for group, name, package in (("backend", "llamacpp", "kv3d_backend_llamacpp"),
                                 ("codec", "int8", "kv3d_codec_int8"), ("codec", "block", "kv3d_codec_block"),
                                 ("tier", "ssd", "kv3d_tier_ssd")):
        f = group_options(group, dirs)[name]
        assert package in f.parts and f.parent.parent != config_dir(), f
        assert not (config_dir() / group / f"{name}.yaml").exists()
    for group, name in (("codec", "none"), ("tier", "ram"), ("detector", "exact"), ("detector", "radix")):
        assert group_options(group, dirs)[name] == config_dir() / group / f"{name}.yaml"
    assert compose(["tier=ssd", "cache.ssd_cold_mb=3"]).tier.capacity_mb == 3     # interpolation across trees


def test_name_of_an_option_selects_the_option():
    """`codec.name=int8` is `codec=int8`: int8's settings, none of none's."""
    cfg = compose(["codec.name=int8", "codec.zstd_level=1"])
    assert cfg.codec.name == "int8" and cfg.codec.zstd_level == 1 and "kernel" in cfg.codec


def test_name_without_an_option_keeps_no_setting_of_the_replaced_option():
    """A plugin with no config group, chosen by `codec.name=`, gets only the keys the
    overrides give: never `zstd_level` of the built-in `none`."""
    cfg = compose(["codec.name=mine", "+codec.level=3"])
    assert dict(cfg.codec) == {"name": "mine", "level": 3}
    assert dict(compose(["codec.name=mine"]).codec) == {"name": "mine"}
    assert dict(compose(["detector.name=other"]).detector) == {"name": "other"}


def test_plugin_settings_are_typed_and_unknown_keys_named():
    from kv3d_core.plugins import make_plugin_manager

    pm = make_plugin_manager()
    name, settings = pm.settings("codec", compose(["codec=int8", "codec.zstd_level='5'"]).codec)
    assert name == "int8" and settings["zstd_level"] == 5 and settings["kernel"] == "auto"
    with pytest.raises(ConfigError, match=r"codec 'int8' has no setting codec\.zstd_levl \(its settings: zstd_level"):
        pm.settings("codec", compose(["codec=int8", "+codec.zstd_levl=5"]).codec)
    with pytest.raises(ConfigError, match=r"codec\.zstd_level: .*abc"):
        pm.settings("codec", compose(["codec=int8", "codec.zstd_level=abc"]).codec)
    with pytest.raises(ConfigError, match=r"codec 'none' has no setting codec\.level"):
        pm.settings("codec", {"name": "none", "zstd_level": 1, "level": 1})
    with pytest.raises(ConfigError, match=r"detector 'exact' has no setting detector\.min_match_tokens"):
        pm.settings("detector", {"name": "exact", "min_match_tokens": 3})
    for group in GROUPS:                     # every default option's node fits its plugin's settings
        pm.settings(group, compose([])[group])


def test_searchpath_override_quotes_and_keeps_the_users():
    assert searchpath_override([config_dir()], ["a=1"]) == ["a=1"]
    out = searchpath_override([config_dir(), Path("/tmp/it's here")], ["hydra.searchpath=[pkg://x]", "a=1"])
    assert out == ["a=1", "hydra.searchpath=[pkg://x,'file:///tmp/it\\'s here']"]
    # another primary config dir (kv3d bench's): it is left out, kv3d's own is searched
    out = searchpath_override([config_dir(), Path("/tmp/bench")], [], primary=Path("/tmp/bench"))
    assert out == [f"hydra.searchpath=['file://{config_dir().resolve()}']"]


def test_a_plugin_config_dir_with_odd_characters(tmp_path):
    from kv3d_core import hookimpl
    from kv3d_core.plugins import make_plugin_manager

    odd = tmp_path / "it's a dir, [with] odd chars = yes"
    (odd / "codec").mkdir(parents=True)
    (odd / "codec" / "odd.yaml").write_text("name: odd\nlevel: 1\n")

    class Odd:
        @hookimpl
        def config_dir(self):
            return str(odd)

    pm = make_plugin_manager(extra=[("odd", Odd())])
    assert dict(compose(["codec=odd"], plugins=pm).codec) == {"name": "odd", "level": 1}


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="server.port|Integer"):
        compose(["server.port=abc"])
    with pytest.raises(ConfigError, match="n_seq_max"):
        compose(["scheduler.n_seq_max=999"])
    with pytest.raises(ConfigError, match="admit_budget_ms"):
        compose(["scheduler.admit_budget_ms=-1"])
    with pytest.raises(ConfigError, match="codec/nope"):
        compose(["+codec=nope"])
    with pytest.raises(ConfigError, match="codec/nope"):
        compose(["codec=nope"])
