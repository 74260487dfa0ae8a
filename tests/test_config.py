"""Hydra composition as `kv3d serve` sees it."""

from __future__ import annotations

import pytest

from kv3d_core.config import compose, config_dir, normalize_overrides
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
    for group in ("backend", "detector", "codec", "tier"):
        for f in (config_dir() / group).glob("*.yaml"):
            for form in (f"{group}={f.stem}", f"+{group}={f.stem}"):
                cfg = compose([form])
                assert cfg[group].name == f.stem, (f, form)


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="server.port|Integer"):
        compose(["server.port=abc"])
    with pytest.raises(ConfigError, match="n_seq_max"):
        compose(["scheduler.n_seq_max=999"])
    with pytest.raises(ConfigError, match="codec/nope"):
        compose(["+codec=nope"])
    with pytest.raises(ConfigError, match="codec/nope"):
        compose(["codec=nope"])
