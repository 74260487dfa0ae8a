"""The user config file: defaults, creation, overrides, precedence, errors, `none`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kv3d_core import userconfig as uc
from kv3d_core.config import compose, default_user_config
from kv3d_core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def cfg_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "kv3d" / "config.json"
    monkeypatch.setenv(uc.ENV_VAR, str(path))
    return path


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_defaults_mirror_the_yaml():
    d = default_user_config()
    assert {s: set(keys) for s, keys in d.items()} == {s: set(keys) for s, keys in uc.SCHEMA.items()}
    cfg = compose([], user_config=False)
    for section, body in d.items():
        for key, value in body.items():
            assert cfg[section][key] == value, f"{section}.{key}"


def test_path_env_default_and_none(tmp_path, monkeypatch):
    monkeypatch.delenv(uc.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert uc.user_config_path() == tmp_path / ".config" / "kv3d" / "config.json"
    monkeypatch.setenv(uc.ENV_VAR, str(tmp_path / "x.json"))
    assert uc.user_config_path() == tmp_path / "x.json"
    monkeypatch.setenv(uc.ENV_VAR, "none")
    assert uc.user_config_path() is None


def test_ensure_creates_0600_with_defaults_and_never_overwrites(cfg_file):
    path, created = uc.ensure_user_config(defaults=default_user_config)
    assert (path, created) == (cfg_file, True)
    assert stat.S_IMODE(cfg_file.stat().st_mode) == 0o600
    assert json.loads(cfg_file.read_text()) == default_user_config()
    assert uc.user_overrides() == [  # every default, as overrides that change nothing
        "server.host='127.0.0.1'", "server.port=8080", "server.threads=null", "server.api_key=null",
        "cache.gpu_hot_mb=256", "cache.ram_warm_mb=1024", "cache.ssd_cold_path='~/.cache/kv3d/cold'",
        "cache.ssd_cold_mb=4096", "model.path=null", "model.id=null"]
    assert compose([]) == compose([], user_config=False)

    write(cfg_file, {"server": {"port": 9000}})
    assert uc.ensure_user_config(defaults=default_user_config) == (cfg_file, False)
    assert json.loads(cfg_file.read_text()) == {"server": {"port": 9000}}


def test_ensure_reports_an_unwritable_location(tmp_path):
    blocker = write(tmp_path / "file", "x")
    with pytest.raises(ConfigError, match="cannot create the user config"):
        uc.ensure_user_config(blocker / "sub" / "config.json", defaults=default_user_config)


def test_file_values_become_overrides_and_the_command_line_wins(cfg_file):
    path = "/my models/it's a \\ ${oc.env:HOME} model.gguf"
    write(cfg_file, {"server": {"port": 9000, "api_key": "sk-123"}, "model": {"path": path, "id": None},
                     "cache": {"ram_warm_mb": 12.5}})
    assert uc.user_overrides() == ["server.port=9000", "server.api_key='sk-123'",
                                   f"model.path={uc.hydra_value(path)}", "model.id=null", "cache.ram_warm_mb=12.5"]
    cfg = compose([])
    assert cfg.server.port == 9000 and cfg.server.api_key == "sk-123"
    assert cfg.model.path == path  # literal: spaces, quote, backslash, no interpolation
    assert cfg.cache.ram_warm_mb == 12.5
    assert cfg.cache.gpu_hot_mb == 256  # not in the file: the yaml default
    cfg = compose(["server.port=9001", "model.path=/other.gguf"])
    assert cfg.server.port == 9001 and cfg.model.path == "/other.gguf"
    assert cfg.server.api_key == "sk-123"


@pytest.mark.parametrize("value", ["plain", "", "it's", "'", "\\", "a\\", "a\\'b", "${x}", "\\${x}", "$HOME",
                                   "a=b,c d", "null", "8080", "true", "ü ✓", "tab\there", "[1, 2]", "{a: 1}"])
def test_strings_survive_hydra_unchanged(cfg_file, value):
    write(cfg_file, {"model": {"id": value}})
    assert compose([]).model.id == value


def test_kv3d_config_cli_precedence(cfg_file):
    """The CLI path `kv3d serve` uses: file over yaml, command line over file."""
    write(cfg_file, {"server": {"port": 9000}, "cache": {"gpu_hot_mb": 64}})
    env = dict(os.environ, **{uc.ENV_VAR: str(cfg_file)})
    out = subprocess.run([sys.executable, "-m", "kv3d_core.cli", "config", "server.port=9001"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "port: 9001" in out.stdout and "gpu_hot_mb: 64" in out.stdout


@pytest.mark.parametrize("content, match", [
    ("{not json", r"not valid JSON: .* line 1 column 2"),
    ("[1, 2]", "top level must be a JSON object"),
    ({"servr": {}}, "unknown section 'servr' \\(did you mean 'server'\\?\\)"),
    ({"server": []}, "section 'server' must be a JSON object"),
    ({"server": {"prot": 1}}, "unknown key in section 'server': 'prot' \\(did you mean 'port'\\?\\)"),
    ({"server": {"port": "9000"}}, "server.port must be an integer"),
    ({"server": {"port": True}}, "server.port must be an integer"),
    ({"server": {"port": 9000.0}}, "server.port must be an integer"),
    ({"server": {"port": 70000}}, "server.port=70000 must be within 0..65535"),
    ({"server": {"port": None}}, "server.port must be an integer, not null"),
    ({"server": {"threads": 0}}, "server.threads=0 must be >= 1"),
    ({"server": {"host": ""}}, "server.host=\"\" must not be empty"),
    ({"cache": {"gpu_hot_mb": 0}}, "cache.gpu_hot_mb=0 must be > 0"),
    ({"cache": {"ram_warm_mb": -1}}, "cache.ram_warm_mb=-1 must be >= 0"),
    ('{"cache": {"ssd_cold_mb": NaN}}', "NaN is not a valid JSON number"),
    ({"model": {"path": 5}}, "model.path must be a string or null"),
])
def test_malformed_files_name_the_file_and_the_key(cfg_file, content, match):
    write(cfg_file, content)
    with pytest.raises(ConfigError, match=match) as exc:
        uc.load_user_config()
    assert str(cfg_file) in str(exc.value) and "KV3D_USER_CONFIG=none" in str(exc.value)
    with pytest.raises(ConfigError, match=match):
        compose([])  # kv3d serve stops with the same message


def test_absent_or_disabled_file_gives_no_overrides(cfg_file, monkeypatch):
    assert not cfg_file.exists() and uc.user_overrides() == []
    write(cfg_file, {"server": {"port": 9000}})
    assert compose([]).server.port == 9000
    monkeypatch.setenv(uc.ENV_VAR, "none")
    assert uc.user_overrides() == [] and uc.load_user_config() is None
    assert compose([]).server.port == 8080
    with pytest.raises(ConfigError, match="disabled"):
        uc.ensure_user_config(defaults=default_user_config)
    assert compose([], user_config=False).server.port == 8080
