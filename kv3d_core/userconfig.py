"""The user's own settings: ``~/.config/kv3d/config.json``.

Contract:

* Path: ``~/.config/kv3d/config.json``; the environment variable ``KV3D_USER_CONFIG``
  names another file, and the value ``none`` disables the file altogether.
* Schema: a JSON object with up to three sections, each optional and each key
  optional (absent = the yaml default)::

      {"server": {"host": str, "port": int, "threads": int|null, "api_key": str|null},
       "cache":  {"gpu_hot_mb": number, "ram_warm_mb": number, "ssd_cold_path": str, "ssd_cold_mb": number},
       "model":  {"path": str|null, "id": str|null}}

  These are keys of ``configs/config.yaml``. An unknown section or key, a wrong
  type or an out-of-range value raises :class:`~kv3d_core.errors.ConfigError`
  naming the file, the key and how to fix it.
* Precedence in :func:`kv3d_core.config.compose`: command-line overrides > this
  file > the yaml defaults. :func:`user_overrides` turns the file into Hydra
  override strings (``server.port=9000``, ``model.path='/my models/m.gguf'``,
  ``model.id=null``) that ``compose`` puts before the command line's. Strings are
  literal: quotes, backslashes and ``${`` are escaped for Hydra's grammar.
* :func:`ensure_user_config` creates a missing file holding every default, with
  mode 0600 because it may hold an API key. The caller hands it the defaults
  (:func:`kv3d_core.config.default_user_config`, read from the composed yaml so the
  two never disagree): this module sits below :mod:`kv3d_core.config` and never
  imports it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from kv3d_core.errors import ConfigError

ENV_VAR = "KV3D_USER_CONFIG"
DISABLED = "none"

_STR, _INT, _NUM = "a string", "an integer", "a number"
#: section -> key -> (expected kind, nullable)
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "server": {"host": (_STR, False), "port": (_INT, False), "threads": (_INT, True), "api_key": (_STR, True)},
    "cache": {"gpu_hot_mb": (_NUM, False), "ram_warm_mb": (_NUM, False), "ssd_cold_path": (_STR, False),
              "ssd_cold_mb": (_NUM, False)},
    "model": {"path": (_STR, True), "id": (_STR, True)},
}


def default_path() -> Path:
    return Path("~/.config/kv3d/config.json").expanduser()


def user_config_path() -> Path | None:
    """The file in effect: ``$KV3D_USER_CONFIG``, else the default; ``None`` when disabled."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() == DISABLED:
        return None
    return Path(env).expanduser() if env else default_path()


def _fix_hint(path: Path) -> str:
    return (f"edit {path} (see `kv3d doctor`), delete it to start again from the defaults, "
            f"or set {ENV_VAR}={DISABLED} to ignore it")


def _check_value(path: Path, section: str, key: str, value: Any) -> None:
    kind, nullable = SCHEMA[section][key]
    where = f"user config {path}: {section}.{key}"
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{where} must be {kind}, not null; {_fix_hint(path)}")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        _STR: isinstance(value, str),
        _INT: is_int,
        _NUM: is_int or (isinstance(value, float) and math.isfinite(value)),
    }[kind]
    if not ok:
        raise ConfigError(f"{where} must be {kind}{' or null' if nullable else ''}, "
                          f"got {json.dumps(value)}; {_fix_hint(path)}")
    problem = None
    if (section, key) == ("server", "port") and not 0 <= value <= 65535:
        problem = "must be within 0..65535"
    elif (section, key) == ("server", "threads") and value < 1:
        problem = "must be >= 1 (or null for every core)"
    elif (section, key) == ("cache", "gpu_hot_mb") and value <= 0:
        problem = "must be > 0"
    elif kind == _NUM and value < 0:
        problem = "must be >= 0"
    elif kind == _STR and key in ("host", "ssd_cold_path") and not value.strip():
        problem = "must not be empty"
    if problem:
        raise ConfigError(f"{where}={json.dumps(value)} {problem}; {_fix_hint(path)}")


def _unknown(path: Path, what: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"user config {path}: unknown {what} {name!r}{hint}; known: {', '.join(known)}; "
                       f"{_fix_hint(path)}")


def validate_user_config(data: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``data`` checked against :data:`SCHEMA`; raises ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"user config {path}: the top level must be a JSON object with the sections "
                          f"{', '.join(SCHEMA)}, got {type(data).__name__}; {_fix_hint(path)}")
    for section, body in data.items():
        if section not in SCHEMA:
            raise _unknown(path, "section", section, list(SCHEMA))
        if not isinstance(body, dict):
            raise ConfigError(f"user config {path}: section {section!r} must be a JSON object, "
                              f"got {json.dumps(body)}; {_fix_hint(path)}")
        for key, value in body.items():
            if key not in SCHEMA[section]:
                raise _unknown(path, f"key in section {section!r}:", key, list(SCHEMA[section]))
            _check_value(path, section, key, value)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def load_user_config(path: Path | None = None) -> dict[str, dict[str, Any]] | None:
    """The validated file contents; ``None`` when the file is disabled or absent."""
    path = user_config_path() if path is None else path
    if path is None or not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"user config {path} cannot be read: {exc}; {_fix_hint(path)}") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"user config {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}; {_fix_hint(path)}") from exc
    except ValueError as exc:
        raise ConfigError(f"user config {path}: {exc}; {_fix_hint(path)}") from exc
    return validate_user_config(data, path)


def ensure_user_config(path: Path | None = None, *,
                       defaults: Callable[[], dict[str, dict[str, Any]]]) -> tuple[Path, bool]:
    """Create the file when missing, holding ``defaults()`` (every key of :data:`SCHEMA`,
    e.g. :func:`kv3d_core.config.default_user_config`; called only then): ``(path, created)``.

    Raises ConfigError when the file is disabled (``KV3D_USER_CONFIG=none`` and no
    ``path``) or cannot be written.
    """
    if path is None:
        path = user_config_path()
        if path is None:
            raise ConfigError(f"the user config file is disabled ({ENV_VAR}={DISABLED})")
    if path.exists():
        return path, False
    text = json.dumps(defaults(), indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never replaces an existing file
        except FileExistsError:
            return path, False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot create the user config {path}: {exc}; make its folder writable, or set "
                          f"{ENV_VAR} to another file (or {DISABLED})") from exc
    return path, True


def hydra_value(value: Any) -> str:
    """``value`` as a Hydra override value that parses back to exactly ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        s = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)  # no interpolation
        s = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, s)  # backslashes before a quote / the end
        return "'" + s.replace("'", "\\'") + "'"
    raise TypeError(f"cannot express {type(value).__name__} as a Hydra override")


def user_overrides(path: Path | None = None) -> list[str]:
    """The file's values as Hydra overrides; empty when the file is absent or disabled."""
    data = load_user_config(path)
    if not data:
        return []
    return [f"{section}.{key}={hydra_value(value)}"
            for section, body in data.items() for key, value in body.items()]
