"""The plugin documentation stays true (in the style of datasette's tests/test_docs.py):

- every hook specification is documented in docs/PLUGINS.md with its signature;
- every method and attribute of the four contract classes (and the backend's Sampler) is
  documented there or in docs/ARCHITECTURE.md, methods with their exact signature;
- every configuration key -- of config.yaml and of every option of every group, kv3d's own
  and the installed plugins' -- has a comment on its line or is named (``cache.ssd_cold_path``)
  in README.md, docs/ARCHITECTURE.md or docs/PLUGINS.md; an option file starts with a comment
  saying what it is, and names the implementation of its file name;
- a plugin's config option and its declared settings have the same keys, and the core's
  schema (``config.CoreSchema``) the keys of config.yaml;
- the code excerpts of docs/PLUGINS.md (``# file: PATH``) are verbatim parts of those files.

No model is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from kv3d_core import hookspecs
from kv3d_core.config import GROUPS, CoreSchema, config_dir, search_path
from kv3d_core.contracts import BlockCodec, DeltaCodec, ExecutionBackend, PrefixDetector, Sampler, StateLayout, StorageTier
from kv3d_core.plugins import make_plugin_manager

REPO = Path(__file__).resolve().parent.parent
PLUGINS_MD = REPO / "docs" / "PLUGINS.md"
ARCHITECTURE_MD = REPO / "docs" / "ARCHITECTURE.md"
README = REPO / "README.md"
CONTRACTS = (DeltaCodec, BlockCodec, StorageTier, PrefixDetector, ExecutionBackend, Sampler, StateLayout)


def plugin_docs() -> str:
    return PLUGINS_MD.read_text() + "\n" + ARCHITECTURE_MD.read_text()


def signature(fn) -> str:
    """``(a, *, b=1)``: the parameters as Python writes them, without self or annotations."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values() if p.name != "self"]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def documented_calls(text: str, name: str) -> list[str]:
    """The parameter lists ``name`` is documented with: every ```name(...)``` in ``text``."""
    return re.findall(r"`" + re.escape(name) + r"(\([^`]*\))`", text)


# -- hooks ------------------------------------------------------------------------------------------
HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "kv3d_spec"))


def test_the_hooks_are_the_ones_this_test_knows():
    assert {"register_backends", "register_detectors", "register_codecs", "register_tiers", "config_dir",
            "register_commands", "register_doctor_checks"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    fn = getattr(hookspecs, hook)
    assert (inspect.getdoc(fn) or "").strip(), f"hookspecs.{hook} has no docstring"
    found = documented_calls(PLUGINS_MD.read_text(), hook)
    assert found, f"docs/PLUGINS.md does not document the hook {hook}{signature(fn)}"
    assert set(found) == {signature(fn)}, f"docs/PLUGINS.md documents {hook} as {found}, not {signature(fn)}"


# -- contracts --------------------------------------------------------------------------------------
def contract_members() -> list[tuple[type, str, object]]:
    out = []
    for cls in CONTRACTS:
        names = [n for n in cls.__dict__ if not n.startswith("_")] + list(cls.__dict__.get("__annotations__", {}))
        for name in dict.fromkeys(names):
            out.append((cls, name, cls.__dict__.get(name)))
    return out


@pytest.mark.parametrize("cls,name,member", contract_members(),
                         ids=[f"{c.__name__}.{n}" for c, n, _ in contract_members()])
def test_every_contract_member_is_documented(cls, name, member):
    text = plugin_docs()
    qual = f"{cls.__name__}.{name}"
    if inspect.isfunction(member):
        found = documented_calls(text, qual)
        assert found, f"{qual}{signature(member)} is not documented in docs/PLUGINS.md or docs/ARCHITECTURE.md"
        assert set(found) == {signature(member)}, f"{qual} is documented as {found}, not {signature(member)}"
        assert (inspect.getdoc(member) or "").strip() or name in ("contains",), f"{qual} has no docstring"
    else:                                   # an attribute or a property
        assert re.search(r"`" + re.escape(qual) + r"`", text), f"`{qual}` is not documented"


def test_no_documented_contract_method_is_gone():
    """Every ```Class.method(...)``` the docs name exists, for the contract classes."""
    text = plugin_docs()
    for cls in CONTRACTS:
        for name in re.findall(r"`" + cls.__name__ + r"\.(\w+)\(", text):
            assert inspect.isfunction(getattr(cls, name, None)), f"the docs name {cls.__name__}.{name}(), which is gone"


# -- configuration keys --------------------------------------------------------------------------------
KEY = re.compile(r"^(\s*)([A-Za-z_]\w*):(.*)$")


def yaml_keys(path: Path, prefix: str = "") -> list[tuple[str, bool]]:
    """``(dotted key, has a comment on its line)`` of every key of a yaml file (block style)."""
    out, stack = [], []
    for line in path.read_text().splitlines():
        m = KEY.match(line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        out.append((prefix + ".".join([k for _, k in stack] + [key]), "#" in rest))
        if not rest.strip() or rest.strip().startswith("#"):
            stack.append((indent, key))
    return out


def option_files() -> list[tuple[str, Path]]:
    """(group, file) of every option of every group on the search path."""
    return [(g, f) for d in search_path() for g in GROUPS for f in sorted((Path(d) / g).glob("*.yaml"))]


def test_every_config_key_is_documented():
    docs = README.read_text() + PLUGINS_MD.read_text() + ARCHITECTURE_MD.read_text()
    missing = []
    files = [("", config_dir() / "config.yaml")] + [(f"{g}.", f) for g, f in option_files()]
    for prefix, f in files:
        for key, commented in yaml_keys(f, prefix):
            if key.split(".")[0] in ("defaults", "hydra") or key.endswith(".name") and prefix:
                continue
            if not commented and not re.search(r"(?<![\w.])" + re.escape(key) + r"(?![\w])", docs):
                missing.append(f"{key} ({f})")
    assert not missing, "undocumented configuration keys (comment them on their line): " + ", ".join(missing)


@pytest.mark.parametrize("group,path", option_files(), ids=[f"{g}/{f.stem}" for g, f in option_files()])
def test_every_option_says_what_it_is(group, path):
    text = path.read_text()
    assert text.startswith("#"), f"{path} does not start with a comment saying what the option is"
    names = [k for k, _ in yaml_keys(path) if k == "name"]
    assert names and re.search(rf"^name: {re.escape(path.stem)}\s*(#.*)?$", text, re.M), \
        f"{path}: its name must be {path.stem!r} (the option selects the implementation of that name)"


def test_plugin_options_and_declared_settings_agree():
    """An option's keys are the settings its implementation declares (documented in the yaml,
    checked by the dataclass); for an implementation with no schema, its factory's keywords."""
    pm = make_plugin_manager()
    for group, path in option_files():
        impl = pm.implementations().get((group, path.stem))
        if impl is None:
            continue
        keys = {k for k, _ in yaml_keys(path)} - {"name"}
        declared = impl.setting_names()
        if declared is not None:
            assert keys == set(declared), f"{path}: keys {sorted(keys)} but {group} {path.stem!r} declares {declared}"
        if impl.settings is not None:       # and every default documented in the yaml is a valid value
            impl.check_settings({})


def test_the_core_schema_and_config_yaml_agree():
    keys = {k for k, _ in yaml_keys(config_dir() / "config.yaml")}

    def fields(schema, prefix=""):
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type) and \
                    dataclasses.is_dataclass(f.default_factory):
                yield from fields(f.default_factory, prefix + f.name + ".")
            else:
                yield prefix + f.name

    schema = set(fields(CoreSchema))
    yaml_core = {k for k in keys if k.split(".")[0] in ("server", "model", "cache", "scheduler", "safety", "analytics", "safe_mode")
                 and (k.count(".") == 1 or k == "safe_mode")}
    assert schema == yaml_core, f"only in the schema: {sorted(schema - yaml_core)}; only in config.yaml: " \
                                f"{sorted(yaml_core - schema)}"


# -- excerpts --------------------------------------------------------------------------------------
def test_plugins_md_excerpts_are_verbatim():
    blocks = re.findall(r"```\w*\n# file: (\S+)\n(.*?)```", PLUGINS_MD.read_text(), re.S)
    assert len(blocks) >= 5
    for path, body in blocks:
        source = (REPO / path).read_text()
        assert body.strip("\n") in source, f"docs/PLUGINS.md's excerpt of {path} is not in that file any more"


def test_plugins_md_links_resolve():
    for target in re.findall(r"\]\(([^)#:]+)\)", PLUGINS_MD.read_text()):
        assert (PLUGINS_MD.parent / target).exists(), f"docs/PLUGINS.md links to {target}, which does not exist"
