"""The example plugin of docs/PLUGINS.md (docs/examples/kv3d-codec-mine), installed as a user
would: ``pip install`` it (here offline, into a directory of its own, so this venv is left as
it was), then ``kv3d plugins`` lists it, ``kv3d config codec=mine`` composes with its settings,
its own contract tests pass, and ``kv3d serve codec=mine`` restores sessions through it.

Only the last test loads the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "kv3d-codec-mine"


def _build_problem() -> str | None:
    """Why this venv cannot build the example without the network (None: it can)."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return None
    try:
        import wheel  # noqa: F401  (older setuptools build wheels through it)
    except ImportError:
        return (f"setuptools {setuptools.__version__} without `wheel` cannot build it offline "
                "(scripts/setup.sh test installs setuptools>=77)")
    return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a shell where the example is pip-installed."""
    problem = _build_problem()
    if problem:
        pytest.skip(problem)
    tmp = tmp_path_factory.mktemp("example")
    src = tmp / "src"           # a copy: the build leaves build/ and *.egg-info next to its sources
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "KV3D_USER_CONFIG": "none", "EXAMPLE_SRC": str(src)}


def kv3d(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kv3d_core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


def test_kv3d_plugins_lists_it(installed):
    proc = kv3d(installed, "plugins")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    mine = rows[("codec", "mine")]
    assert (mine["distribution"], mine["version"], mine["plugin"]) == ("kv3d-codec-mine", "0.1.0", "codec_mine")
    assert mine["settings"] == ["level"]
    assert not [r for r in rows.values() if r["kind"] == "broken"]


def test_kv3d_config_composes_its_config_group(installed):
    for args, level in ((["codec=mine"], 6), (["codec=mine", "codec.level=9"], 9), (["+codec=mine"], 6),
                        (["codec.name=mine"], 6)):
        proc = kv3d(installed, "config", *args)
        assert proc.returncode == 0, proc.stderr
        assert f"codec:\n  name: mine\n  level: {level}\n" in proc.stdout, (args, proc.stdout)


def test_its_settings_are_checked_and_it_is_made(installed):
    code = ("from kv3d_core.config import compose\n"
            "from kv3d_core.plugins import make_plugin_manager\n"
            "from kv3d_core.errors import ConfigError\n"
            "pm = make_plugin_manager()\n"
            "codec = pm.configure('codec', compose(['codec=mine', \"codec.level='2'\"], plugins=pm).codec)\n"
            "print(type(codec).__name__, codec.level)\n"
            "try:\n"
            "    pm.settings('codec', compose(['codec=mine', '+codec.zstd_level=1'], plugins=pm).codec)\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=installed, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["MineCodec 2",
                                        "codec 'mine' has no setting codec.zstd_level (its settings: level)"]


def test_its_contract_tests_pass(installed):
    src = Path(installed["EXAMPLE_SRC"])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")],
                          capture_output=True, text=True, env=installed, timeout=600, cwd=src)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_without_the_plugin_the_option_is_missing():
    proc = kv3d({**os.environ, "KV3D_USER_CONFIG": "none"}, "config", "codec=mine")
    assert proc.returncode == 1 and "codec/mine" in proc.stderr and "kv3d plugins" in proc.stderr


# -- the model: kv3d serve codec=mine ---------------------------------------------------------
SYSTEM = ("You are the front desk of a small hotel by a lake. You answer questions about rooms, breakfast "
          "(7 to 10), parking (free, behind the building) and the sauna. Keep every answer short.")


def chat(url: str, messages: list[dict]) -> dict:
    from conftest import MODEL_ID

    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def test_kv3d_serve_restores_sessions_through_it(installed, tmp_path):
    """Idle sessions spill to the warm tier through the mine codec and resume from it."""
    from conftest import running_server

    env = {k: installed[k] for k in ("PYTHONPATH", "KV3D_USER_CONFIG")}
    small = ["codec=mine", "cache.gpu_hot_mb=8", "scheduler.n_seq_max=4", "scheduler.max_running=2"]
    first = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Guest {i}: is breakfast included?"}]
             for i in range(6)]
    with running_server(tmp_path, small, env=env) as srv:
        replies = [chat(srv.url, m)["choices"][0]["message"]["content"] for m in first]
        seconds = [chat(srv.url, m + [{"role": "assistant", "content": r}, {"role": "user", "content": "And parking?"}])
                   for m, r in zip(first, replies)]
        m = srv.metrics()
        stats = srv.stats()
    assert stats["codec"]["name"] == "mine"
    assert m.get('kv3d_spills_total{tier="warm"}', 0) >= 3 and m.get('kv3d_restores_total{tier="warm"}', 0) >= 3
    assert m.get('kv3d_codec_ratio{codec="mine"}', 0) > 1.0
    assert m.get("kv3d_safe_mode", 0) == 0
    for s in seconds:       # resumed (from hot or warm): the first turn's tokens were not recomputed
        u = s["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] >= u["prompt_tokens"] - 30, u
