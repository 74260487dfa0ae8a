"""The plugin manager: built-ins and entry points, clear failures, a fresh manager per test."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys

import pytest

from kv3d_core import hookimpl
from kv3d_core.contracts import KINDS
from kv3d_core.errors import ConfigError, PluginError
from kv3d_core.plugins import make_plugin_manager


@pytest.fixture()
def pm():
    return make_plugin_manager()


def test_builtins_and_entry_points(pm):
    rows = {(r["kind"], r["name"]): r for r in pm.describe()}
    assert rows[("detector", "exact")]["distribution"] == "kv3d"
    assert rows[("detector", "radix")]["distribution"] == "kv3d"
    assert rows[("codec", "none")]["distribution"] == "kv3d"
    assert rows[("tier", "ram")]["distribution"] == "kv3d"
    backend = rows[("backend", "llamacpp")]       # found through the "kv3d" entry-point group
    assert backend["distribution"] == "kv3d-backend-llamacpp"
    assert backend["version"] == md.version("kv3d-backend-llamacpp")
    # plus the commands and doctor checks of installed plugins (kv3d-tools: bench, quality, synth-model)
    assert {r["kind"] for r in pm.describe()} <= set(KINDS) | {"command", "doctor_check"}


def test_missing_plugin_fails_loudly(pm):
    with pytest.raises(PluginError) as exc:
        pm.get("codec", "zfp-magic")
    msg = str(exc.value)
    assert "codec plugin 'zfp-magic' is not installed" in msg and "installed codecs:" in msg


def test_unknown_kind(pm):
    with pytest.raises(PluginError, match="unknown plugin kind"):
        pm.get("scheduler", "x")


def test_managers_are_independent():
    from kv3d_core.kv.codec_none import NoneCodec

    class Extra:
        @hookimpl
        def register_codecs(self, register):
            register("test-only", NoneCodec)

    with_extra = make_plugin_manager(extra=[("extra", Extra())])
    plain = make_plugin_manager()
    made = with_extra.create("codec", "test-only", zstd_level=3)
    assert isinstance(made, NoneCodec) and made.zstd_level == 3
    assert "test-only" not in plain.names("codec")


@pytest.mark.parametrize("kind,hook", [("codec", "register_codecs"), ("tier", "register_tiers"),
                                       ("detector", "register_detectors"), ("backend", "register_backends")])
def test_a_factory_must_return_its_kinds_contract(kind, hook):
    class NotAContract:
        def close(self):
            self.closed = True

    made = []

    def factory(**kw):
        made.append(NotAContract())
        return made[-1]

    plugin = type("Wrong", (), {hook: hookimpl(lambda self, register: register("wrong", factory))})()
    pm = make_plugin_manager(extra=[("wrong", plugin)])
    with pytest.raises(PluginError, match=rf"{kind} plugin 'wrong' .* returned .*NotAContract, which is not a "
                                          rf"kv3d_core\.contracts\.{kind}\."):
        pm.create(kind, "wrong")
    assert getattr(made[0], "closed", False) == (kind == "backend")     # a backend is closed, not leaked


def test_a_misspelt_hook_is_an_error():
    class Misspelt:
        @hookimpl
        def register_codec(self, register):         # the hook is register_codecs
            register("never", lambda **kw: None)

    with pytest.raises(PluginError, match=r"plugin 'misspelt' implements register_codec, which kv3d has no hook "
                                          r"for \(a misspelt hook name\?\); the hooks are: config_dir, "):
        make_plugin_manager(extra=[("misspelt", Misspelt())])

    class WrongArgs:
        @hookimpl
        def register_codecs(self, registr):
            pass

    with pytest.raises(PluginError, match="does not fit kv3d's hooks"):
        make_plugin_manager(extra=[("wrong-args", WrongArgs())])


def test_an_installed_plugin_with_a_misspelt_hook_is_broken(monkeypatch, tmp_path):
    (tmp_path / "kv3d_test_misspelt.py").write_text(
        "from kv3d_core import hookimpl\n\n"
        "@hookimpl\ndef register_codec(register):\n    register('misspelt', object)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = md.entry_points

    def fake_entry_points(**kw):
        eps = list(real(**kw))
        if kw.get("group") == "kv3d":
            eps.append(md.EntryPoint(name="codec_misspelt", value="kv3d_test_misspelt", group="kv3d"))
        return eps

    monkeypatch.setattr(md, "entry_points", fake_entry_points)
    pm = make_plugin_manager()
    broken = [r for r in pm.describe() if r["kind"] == "broken"]
    assert [b["name"] for b in broken] == ["codec_misspelt"] and "register_codec" in broken[0]["error"]
    assert pm.pm.get_plugin("codec_misspelt") is None
    with pytest.raises(PluginError, match="failed to load: .*register_codec"):
        pm.get("codec", "misspelt")


def test_duplicate_registration_is_an_error():
    class Dup:
        @hookimpl
        def register_detectors(self, register):
            register("exact", lambda **kw: None)

    pm = make_plugin_manager(extra=[("dup", Dup())])
    with pytest.raises(PluginError, match="registered twice"):
        pm.implementations()


def test_broken_entry_point_is_reported_and_fatal_only_when_configured(monkeypatch):
    real = md.entry_points

    def fake_entry_points(**kw):
        eps = list(real(**kw))
        if kw.get("group") == "kv3d":
            eps.append(md.EntryPoint(name="codec_broken", value="kv3d_no_such_module.plugin", group="kv3d"))
        return eps

    monkeypatch.setattr(md, "entry_points", fake_entry_points)
    pm = make_plugin_manager()
    broken = [r for r in pm.describe() if r["kind"] == "broken"]
    assert broken and broken[0]["name"] == "codec_broken" and "ModuleNotFoundError" in broken[0]["error"]
    assert "exact" in pm.names("detector")       # the rest still works
    with pytest.raises(PluginError, match="failed to load"):
        pm.get("codec", "broken")


def test_factory_rejecting_settings(pm):
    with pytest.raises(PluginError, match="rejected its settings"):
        pm.create("tier", "ram", this_setting_does_not_exist=1)


def test_kv3d_plugins_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "kv3d_core.cli", "plugins"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert {"name", "kind", "version", "distribution"} <= set(rows[0])
    assert any(r["kind"] == "backend" and r["name"] == "llamacpp" for r in rows)


def test_settings_schema_is_a_dataclass():
    class BadSchema:
        @hookimpl
        def register_codecs(self, register):
            register("bad-schema", lambda **kw: None, settings={"level": int})

    with pytest.raises(PluginError, match="must be a dataclass"):
        make_plugin_manager(extra=[("bad", BadSchema())]).implementations()


def test_settings_without_a_schema_come_from_the_factory_signature():
    def strict(level: int = 1):
        return level

    class Plain:
        @hookimpl
        def register_codecs(self, register):
            register("strict", strict)
            register("loose", lambda **kw: kw)

    pm = make_plugin_manager(extra=[("plain", Plain())])
    assert pm.settings("codec", {"name": "strict", "level": 3}) == ("strict", {"level": 3})
    with pytest.raises(ConfigError, match=r"codec 'strict' has no setting codec\.zstd_level \(its settings: level\)"):
        pm.settings("codec", {"name": "strict", "zstd_level": 0})
    assert pm.settings("codec", {"name": "loose", "anything": 1}) == ("loose", {"anything": 1})
    assert [r["settings"] for r in pm.describe() if r["name"] in ("strict", "loose")] == [None, ["level"]]


def test_a_plugins_config_dir_is_on_the_search_path(tmp_path):
    from kv3d_core.config import compose, search_path

    (tmp_path / "codec").mkdir()
    (tmp_path / "codec" / "shipped.yaml").write_text("name: shipped\nlevel: 2\n")

    class Shipping:
        @hookimpl
        def config_dir(self):
            return str(tmp_path)

    class Missing:
        @hookimpl
        def config_dir(self):
            return str(tmp_path / "not-there")

    pm = make_plugin_manager(extra=[("shipping", Shipping()), ("missing", Missing())])
    assert tmp_path.resolve() in search_path(pm)
    assert dict(compose(["codec=shipped"], plugins=pm).codec) == {"name": "shipped", "level": 2}
    assert dict(compose(["codec.name=shipped"], plugins=pm).codec) == {"name": "shipped", "level": 2}
    broken = [r for r in pm.describe() if r["kind"] == "broken"]
    assert [r["name"] for r in broken] == ["missing"] and "not a directory" in broken[0]["error"]


class CommandsAndChecks:
    """A plugin adding a `kv3d` command and doctor checks."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def register_commands(self, register):
        def hello(args):
            self.calls.append(args)
            print("hello", *args)
            return 3 if args == ["fail"] else None

        register("hello", hello, help="say hello")

    @hookimpl
    def register_doctor_checks(self, register):
        register("hello check", lambda cfg: ("OK", f"cfg given: {cfg is not None}"))
        register("hello rows", lambda cfg: [("WARN", "first", "do this"), ("INFO", "second")])
        register("hello broken", lambda cfg: 1 / 0)


def test_plugin_commands_are_registered_and_dispatched(monkeypatch, capsys):
    import kv3d_core.plugins as plugins
    from kv3d_core import cli

    plugin = CommandsAndChecks()
    # without the installed plugins' entry points: kv3d-tools registers commands of its own
    pm = make_plugin_manager(load_entry_points=False, extra=[("hello-plugin", plugin)])
    assert list(pm.commands()) == ["hello"] and pm.commands()["hello"].help == "say hello"
    assert {(r["kind"], r["name"]) for r in pm.describe()} >= {("command", "hello"), ("doctor_check", "hello check")}
    monkeypatch.setattr(plugins, "make_plugin_manager",
                        lambda **kw: make_plugin_manager(load_entry_points=False, extra=[("hello", plugin)]))
    assert cli.main(["hello", "a", "--b"]) == 0 and plugin.calls == [["a", "--b"]]
    assert "hello a --b" in capsys.readouterr().out
    assert cli.main(["hello", "fail"]) == 3
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "plugin commands:\n  hello" in out and "say hello" in out and "\n  serve " in out
    assert cli.main(["no-such-command"]) == 2


@pytest.mark.parametrize("name", ["serve", "doctor", "plugins"])
def test_a_plugin_cannot_replace_kv3ds_commands(name):
    class Hijack:
        @hookimpl
        def register_commands(self, register):
            register(name, lambda args: 0)

    with pytest.raises(PluginError, match=f"registered the command '{name}', which is kv3d's own"):
        make_plugin_manager(extra=[("hijack", Hijack())]).commands()


def test_a_command_registered_twice_is_an_error():
    def make():
        class Twice:
            @hookimpl
            def register_commands(self, register):
                register("same", lambda args: 0)
        return Twice()

    with pytest.raises(PluginError, match="command 'same' is registered twice"):
        make_plugin_manager(extra=[("one", make()), ("two", make())]).commands()


def test_doctor_runs_plugin_checks(monkeypatch):
    import kv3d_core.plugins as plugins
    from kv3d_core import doctor

    monkeypatch.setattr(plugins, "make_plugin_manager",
                        lambda **kw: make_plugin_manager(extra=[("hello", CommandsAndChecks())]))
    rows = {(c.check, c.status): c for c in doctor.plugin_checks(None)}
    assert rows[("hello check", "OK")].detail == "cfg given: False"
    assert rows[("hello rows", "WARN")].fix == "do this" and ("hello rows", "INFO") in rows
    broken = rows[("hello broken", "WARN")]
    assert "ZeroDivisionError" in broken.detail and "(registered in code)" in broken.detail
