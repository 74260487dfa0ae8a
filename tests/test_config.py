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


def test_plus_group_merges_over_body_defaults():
    cfg = compose(["+codec=none", "+tier=ram", "+detector=radix"])
    assert cfg.codec.name == "none" and cfg.tier.name == "ram"
    assert cfg.detector.name == "radix" and cfg.detector.min_match_tokens == 16


def test_group_without_plus_is_accepted():
    assert normalize_overrides(["codec=int8", "codec.zstd_level=3", "server.port=1"]) == [
        "+codec=int8", "codec.zstd_level=3", "server.port=1"]
    assert compose(["detector=radix"]).detector.name == "radix"


def test_every_group_option_composes():
    for group in ("backend", "detector", "codec", "tier"):
        for f in (config_dir() / group).glob("*.yaml"):
            prefix = "" if group == "backend" else "+"
            cfg = compose([f"{prefix}{group}={f.stem}"])
            assert cfg[group].name == f.stem, f


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="server.port|Integer"):
        compose(["server.port=abc"])
    with pytest.raises(ConfigError, match="n_seq_max"):
        compose(["scheduler.n_seq_max=999"])
    with pytest.raises(ConfigError, match="codec/nope"):
        compose(["+codec=nope"])
