"""Structured output: JSON schemas (``response_format``, tool parameters) as llama.cpp grammars.

A schema is first checked against what the grammar can enforce. Anything it cannot -- a
keyword the converter would silently drop (``minimum``, ``uniqueItems``, ``not``...), an
unknown ``type``, a regex feature it cannot express -- is a :class:`SchemaError` naming the
keyword and where it is, which the API turns into a 400: a reply is never constrained by
less than the schema asks. What passes is converted by llama-cpp-python's JSON-schema ->
GBNF converter (``llama_cpp.llama_grammar.SchemaConverter``), with three changes so that
every string the grammar allows is valid JSON: string characters exclude the control
characters JSON forbids raw, a regex ``.`` and negated classes exclude ``"``, ``\\`` and
control characters, and ``{}`` (any value) is any JSON value rather than any object. Integer
bounds (``minimum``, ``maximum``, exclusive ones), which the converter would drop, are written
out as digit ranges.

The grammar may enforce a *subset* of a schema (a ``pattern`` without anchors is generated
as a full match; ``\\s`` as a space): every output still validates against the schema.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

MAX_SCHEMA_DEPTH = 48
MAX_SCHEMA_NODES = 4096

TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "example", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "discriminator", "$anchor"})
COMBINATORS = ("anyOf", "oneOf", "allOf", "$ref")
BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"pattern", "format", "minLength", "maxLength"},
    "number": set(),
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
}
GENERAL = {"type", "enum", "const", "$defs", "definitions", *COMBINATORS}
KNOWN_UNSUPPORTED = {
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not", "if", "then", "else",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems", "contains", "minContains",
    "maxContains", "uniqueItems", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef",
    "$recursiveRef",
}
INT_BOUND = 10**15          # integer bounds a grammar writes out (the converter's integers have <= 16 digits)
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}

# JSON-safe pieces (see the module docstring)
_SAFE_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_SAFE_DOT = r'[^"\\\x7F\x00-\x1F]'
_UNSAFE_IN_CLASS = '"\\\\\\x00-\\x1F\\x7F'      # appended to negated classes: [^a] -> [^a"\\\x00-\x1F\x7F]


class SchemaError(ValueError):
    """A schema the grammar cannot enforce. ``path`` names where (``properties.age.minimum``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.detail = message


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Checker:
    """Walks a schema: refuses what the grammar cannot enforce, and returns a copy the
    converter reads as intended (type lists split into anyOf branches, ``true`` subschemas
    as ``{}``, regex patterns in the converter's dialect)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes = 0

    def check(self, schema: Any, path: str, depth: int = 0, *, where: str = "schema") -> dict:
        """The converter's copy of ``schema`` at ``path`` (SchemaError: what it cannot enforce)."""
        self._count(path, depth)
        if schema is True:
            return {}
        if schema is False:
            raise SchemaError(path, "the schema 'false' allows no value at all")
        if not isinstance(schema, dict):
            raise SchemaError(path, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        keys = set(schema)
        _check_keywords(keys, path)
        types = _check_types(schema.get("type"), path)
        _check_combinator_siblings(schema, keys, path)
        out = self._defs(schema, path, depth)
        # the first of these that the schema has decides what it is; the rest is never read
        if "$ref" in schema:
            return self._ref(schema["$ref"], out, path)
        for comb in ("anyOf", "oneOf"):
            if comb in schema:
                return self._any_of(comb, schema[comb], out, path, depth)
        if "allOf" in schema:
            return self._all_of(schema["allOf"], out, path, depth)
        if "enum" in schema:
            return _enum(schema["enum"], types, schema.get("type"), out, path)
        if "const" in schema:
            return _const(schema["const"], types, schema.get("type"), out, path)
        if types is not None and len(types) > 1:
            return self._type_branches(schema, types, out, path, depth)
        return self._single_type(schema, keys, types, out, path, depth)

    def _count(self, path: str, depth: int) -> None:
        """Counts one more subschema; refuses a schema too large or too deep."""
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise SchemaError(path, f"the schema has more than {MAX_SCHEMA_NODES} subschemas")
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(path, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")

    def _defs(self, schema: dict, path: str, depth: int) -> dict:
        """A new output holding the checked ``$defs`` / ``definitions`` of ``schema``."""
        out: dict = {}
        for defs in ("$defs", "definitions"):
            if defs in schema:
                d = schema[defs]
                if not isinstance(d, dict):
                    raise SchemaError(_join(path, defs), f"'{defs}' must be an object of schemas")
                out[defs] = {name: self.check(sub, _join(_join(path, defs), name), depth + 1) for name, sub in d.items()}
        return out

    def _ref(self, ref: Any, out: dict, path: str) -> dict:
        """``out`` with a ``$ref`` to one of the root's definitions (which must exist)."""
        if not isinstance(ref, str) or not re.fullmatch(r"#/(\$defs|definitions)/[^/]+", ref):
            raise SchemaError(_join(path, "$ref"), "only references to the root's definitions "
                                                    "('#/$defs/name', '#/definitions/name') are supported")
        self._resolve(ref, path)
        out["$ref"] = ref
        return out

    def _any_of(self, comb: str, alts: Any, out: dict, path: str, depth: int) -> dict:
        """``out`` with ``anyOf`` / ``oneOf`` as checked ``anyOf`` branches."""
        if not isinstance(alts, list) or not alts:
            raise SchemaError(_join(path, comb), f"'{comb}' must be a non-empty list of schemas")
        out["anyOf"] = [self.check(a, _join(_join(path, comb), i), depth + 1) for i, a in enumerate(alts)]
        return out

    def _all_of(self, parts: Any, out: dict, path: str, depth: int) -> dict:
        """``out`` with ``allOf``, which the converter merges only over plain object schemas."""
        if not isinstance(parts, list) or not parts:
            raise SchemaError(_join(path, "allOf"), "'allOf' must be a non-empty list of schemas")
        checked = []
        for i, part in enumerate(parts):
            p = _join(_join(path, "allOf"), i)
            c = self.check(part, p, depth + 1)
            target = self._resolve(c["$ref"], p) if "$ref" in c else c
            if not isinstance(target, dict) or set(target) - ANNOTATIONS - {"type", "properties", "required",
                                                                            "additionalProperties", "$ref"} \
                    or target.get("type", "object") != "object" or target.get("additionalProperties") not in (None, False):
                raise SchemaError(p, "'allOf' is supported only over object schemas with 'properties' and 'required'")
            checked.append(c)
        out["allOf"] = checked
        return out

    def _type_branches(self, schema: dict, types: list[str], out: dict, path: str, depth: int) -> dict:
        """``out`` with a type list as ``anyOf`` branches, one per type."""
        # ["string", "null"]: one branch per type, each with the keywords that apply to it
        branches = []
        for x in types:
            sub = {k: v for k, v in schema.items() if k in BY_TYPE[x]}
            sub["type"] = x
            branches.append(self.check(sub, path, depth + 1))
        out["anyOf"] = branches
        return out

    def _single_type(self, schema: dict, keys: set, types: list[str] | None, out: dict, path: str,
                     depth: int) -> dict:
        """``out`` for a schema of one type (given, or told by its keywords; none: any value)."""
        present = {k for k in keys if k not in ANNOTATIONS and k not in GENERAL and not k.startswith("x-")}
        kind = types[0] if types else next((x for x in ("object", "array", "string") if present & BY_TYPE[x]), None)
        if kind is None:
            if out:
                raise SchemaError(path, "a schema with only definitions allows any value; give it a 'type'")
            return {}                            # any JSON value
        stray = sorted(present - BY_TYPE[kind])
        if stray:
            if stray[0] in BY_TYPE["integer"]:
                raise SchemaError(_join(path, stray[0]), f"'{stray[0]}' is supported for integers only (a grammar "
                                                         f"cannot bound decimals)")
            raise SchemaError(_join(path, stray[0]), f"'{stray[0]}' does not apply to type '{kind}'")
        out["type"] = kind
        getattr(self, f"_{kind}", lambda s, o, p, d: None)(schema, out, path, depth)
        return out

    def _resolve(self, ref: str, path: str) -> Any:
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(_join(path, "$ref"), f"reference {ref!r} points nowhere")
            target = target[part]
        return target

    def _object(self, schema: dict, out: dict, path: str, depth: int) -> None:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(_join(path, "properties"), "'properties' must be an object of schemas")
        req = schema.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req) or len(set(req)) != len(req):
            raise SchemaError(_join(path, "required"), "'required' must be a list of distinct property names")
        for r in req:
            if r not in props:
                raise SchemaError(_join(path, "required"), f"required property '{r}' has no schema in 'properties'")
        if props or "properties" in schema:
            out["properties"] = {k: self.check(v, _join(_join(path, "properties"), k), depth + 1) for k, v in props.items()}
        if req:
            out["required"] = list(req)
        if "additionalProperties" in schema:
            ap = schema["additionalProperties"]
            if ap is False or ap is True:
                out["additionalProperties"] = ap
            else:
                out["additionalProperties"] = self.check(ap, _join(path, "additionalProperties"), depth + 1)
        elif not props:
            out["additionalProperties"] = True   # {"type": "object"}: any object
        # else: properties given, additionalProperties absent -> the grammar writes only the listed
        # properties (a subset of what the schema allows)

    def _array(self, schema: dict, out: dict, path: str, depth: int) -> None:
        items, prefix = schema.get("items"), schema.get("prefixItems")
        if prefix is not None:
            if not isinstance(prefix, list) or not prefix:
                raise SchemaError(_join(path, "prefixItems"), "'prefixItems' must be a non-empty list of schemas")
            for k in ("minItems", "maxItems"):
                if k in schema:
                    raise SchemaError(_join(path, k), f"'{k}' beside 'prefixItems' is not supported")
            if items not in (None, False):
                raise SchemaError(_join(path, "items"), "'items' beside 'prefixItems' is supported only as false")
            out["prefixItems"] = [self.check(s, _join(_join(path, "prefixItems"), i), depth + 1)
                                  for i, s in enumerate(prefix)]
            return
        if isinstance(items, list):              # draft-04 tuple form
            if not items:
                raise SchemaError(_join(path, "items"), "'items' must not be an empty list")
            out["prefixItems"] = [self.check(s, _join(_join(path, "items"), i), depth + 1) for i, s in enumerate(items)]
            return
        out["items"] = self.check(items if items is not None else True, _join(path, "items"), depth + 1)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        _bounds(path, "minItems", lo, "maxItems", hi)
        if lo:
            out["minItems"] = lo
        if hi is not None:
            out["maxItems"] = hi

    def _integer(self, schema: dict, out: dict, path: str, depth: int) -> None:
        lo = hi = None
        for name in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if name not in schema:
                continue
            v = schema[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > INT_BOUND:
                raise SchemaError(_join(path, name), f"'{name}' must be a number within +-{INT_BOUND:.0e}")
            if name == "minimum":
                b = math.ceil(v)
            elif name == "exclusiveMinimum":
                b = math.floor(v) + 1
            elif name == "maximum":
                b = math.floor(v)
            else:
                b = math.ceil(v) - 1
            if name.endswith("inimum"):
                lo = b if lo is None else max(lo, b)
            else:
                hi = b if hi is None else min(hi, b)
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(path, "no integer lies within its minimum and maximum")
        if lo is not None:
            out["minimum"] = lo
        if hi is not None:
            out["maximum"] = hi

    def _string(self, schema: dict, out: dict, path: str, depth: int) -> None:
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        _bounds(path, "minLength", lo, "maxLength", hi)
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt is not None:
            if not isinstance(fmt, str) or fmt not in FORMATS:
                raise SchemaError(_join(path, "format"),
                                  f"format {json.dumps(fmt)} is not supported (supported: {', '.join(sorted(FORMATS))})")
            if pattern is not None or "minLength" in schema or "maxLength" in schema:
                raise SchemaError(_join(path, "format"), "'format' together with 'pattern' or a length is not supported")
            out["format"] = fmt
            return
        if pattern is not None:
            if "minLength" in schema or "maxLength" in schema:
                raise SchemaError(_join(path, "pattern"), "'pattern' together with a length is not supported")
            out["pattern"] = translate_pattern(pattern, _join(path, "pattern"))
            return
        if "minLength" in schema:
            out["minLength"] = lo
        if hi is not None:
            out["maxLength"] = hi


def _check_keywords(keys: set, path: str) -> None:
    """Refuses non-string keys, and keywords that are unknown or that the grammar cannot enforce."""
    for k in keys:
        if not isinstance(k, str):
            raise SchemaError(path, "schema keys must be strings")
    unknown = sorted(k for k in keys if k not in ANNOTATIONS and k not in GENERAL and not k.startswith("x-")
                     and not any(k in v for v in BY_TYPE.values()))
    for k in unknown:
        if k in KNOWN_UNSUPPORTED:
            raise SchemaError(_join(path, k), f"'{k}' is not supported in a schema (the grammar cannot enforce it)")
        raise SchemaError(_join(path, k), f"unknown schema keyword '{k}'")


def _check_types(t: Any, path: str) -> list[str] | None:
    """The types a ``type`` keyword names (None: no ``type``)."""
    if t is None:
        return None
    types = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    if not types or not all(isinstance(x, str) for x in types):
        raise SchemaError(_join(path, "type"), "'type' must be a type name or a list of them")
    for x in types:
        if x not in TYPES:
            raise SchemaError(_join(path, "type"), f"unknown type '{x}' (known: {', '.join(TYPES)})")
    if len(set(types)) != len(types):
        raise SchemaError(_join(path, "type"), "'type' lists a type twice")
    return types


def _check_combinator_siblings(schema: dict, keys: set, path: str) -> None:
    """Refuses keywords beside a combinator (the converter would drop them)."""
    for comb in COMBINATORS:
        if comb in schema:
            others = sorted(k for k in keys if k not in ANNOTATIONS and k not in ("$defs", "definitions", comb)
                            and not k.startswith("x-")
                            and not (k == "type" and comb == "allOf" and schema["type"] == "object"))
            if others:
                raise SchemaError(_join(path, others[0]),
                                  f"'{others[0]}' beside '{comb}' is not supported (move it into the branches)")


def _enum(e: Any, types: list[str] | None, t: Any, out: dict, path: str) -> dict:
    """``out`` with ``enum``, each value of the schema's ``type`` ``t`` where it has one."""
    if not isinstance(e, list) or not e:
        raise SchemaError(_join(path, "enum"), "'enum' must be a non-empty list")
    if types is not None:
        for v in e:
            if not _is_type(v, types):
                raise SchemaError(_join(path, "enum"), f"enum value {json.dumps(v)} is not of type {t}")
    out["enum"] = e
    return out


def _const(value: Any, types: list[str] | None, t: Any, out: dict, path: str) -> dict:
    """``out`` with ``const``, of the schema's ``type`` ``t`` where it has one."""
    if types is not None and not _is_type(value, types):
        raise SchemaError(_join(path, "const"), f"const value is not of type {t}")
    out["const"] = value
    return out


def _bounds(path: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
    for name, v in ((lo_name, lo), (hi_name, hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 100_000):
            raise SchemaError(_join(path, name), f"'{name}' must be an integer within 0..100000")
    if hi is not None and lo is not None and lo > hi:
        raise SchemaError(_join(path, lo_name), f"'{lo_name}' is larger than '{hi_name}'")


def _is_type(v: Any, types: list[str]) -> bool:
    for t in types:
        if (t == "string" and isinstance(v, str)) or (t == "boolean" and isinstance(v, bool)) or \
                (t == "null" and v is None) or (t == "object" and isinstance(v, dict)) or \
                (t == "array" and isinstance(v, list)) or \
                (t == "integer" and isinstance(v, int) and not isinstance(v, bool)) or \
                (t == "number" and isinstance(v, (int, float)) and not isinstance(v, bool)):
            return True
    return False


_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_NEG_CLASS_ESCAPES = {"D": "0-9", "W": "a-zA-Z0-9_", "S": " \\t\\n\\r"}


def translate_pattern(pattern: Any, path: str) -> str:
    """A regex in the dialect of the grammar converter: anchored both ends, ``\\d \\w \\s``
    and their negations as classes, ``(?:`` as ``(``, lazy quantifiers as greedy ones (the
    same strings match in full). Refuses what it cannot express."""
    if not isinstance(pattern, str) or not pattern:
        raise SchemaError(path, "'pattern' must be a non-empty string")
    p = _strip_anchors(pattern)
    out: list[str] = []
    i, n = 0, len(p)
    depth = 0
    while i < n:
        c = p[i]
        if c == "\\":
            if i + 1 >= n:
                raise SchemaError(path, "the pattern ends with a lone backslash")
            out.append(_pattern_escape(p[i + 1], path))
            i += 2
        elif c == "[":
            piece, i = _pattern_class(p, i, path)
            out.append(piece)
        elif c == "(":
            if p.startswith("(?:", i):
                i += 3
            elif i + 1 < n and p[i + 1] == "?":
                raise SchemaError(path, "pattern: lookarounds, named groups and flags are not supported")
            else:
                i += 1
            out.append("(")
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise SchemaError(path, "pattern: unbalanced ')'")
            out.append(")")
            i += 1
        elif c in "*+?}":
            out.append(c)
            i += 1
            if i < n and p[i] in "?+":           # lazy / possessive: the same strings match in full
                i += 1
        else:
            out.append(_pattern_literal(c, path))
            i += 1
    if depth:
        raise SchemaError(path, "pattern: unbalanced '('")
    return "^" + "".join(out) + "$"


def _strip_anchors(pattern: str) -> str:
    """``pattern`` without a leading ``^`` and a trailing unescaped ``$`` (the grammar anchors both)."""
    p = pattern
    if p.startswith("^"):
        p = p[1:]
    if p.endswith("$") and not p.endswith("\\$"):
        p = p[:-1]
    return p


def _pattern_escape(e: str, path: str) -> str:
    """The converter's form of the escape ``\\e`` outside a class."""
    if e in _CLASS_ESCAPES:
        return f"[{_CLASS_ESCAPES[e]}]"
    if e in _NEG_CLASS_ESCAPES:
        return f"[^{_NEG_CLASS_ESCAPES[e]}{_UNSAFE_IN_CLASS}]"
    if e in "[](){}|*+?":
        return "\\" + e                      # the converter reads these as the literal character
    if e in ".^$":
        return "[" + ("\\^" if e == "^" else e) + "]"
    if e in "-/":
        return e
    if e == "n" or e == "t":
        raise SchemaError(path, "pattern: control characters (\\n, \\t) are not supported")
    raise SchemaError(path, f"pattern: the escape '\\{e}' is not supported")


def _pattern_class(p: str, i: int, path: str) -> tuple[str, int]:
    """The converter's form of the class opening at ``p[i]``, and the index just past it."""
    n = len(p)
    j = i + 1
    neg = j < n and p[j] == "^"
    if neg:
        j += 1
    body = []
    if j < n and p[j] == "]":
        body.append("\\]")
        j += 1
    while j < n and p[j] != "]":
        if p[j] == "\\":
            if j + 1 >= n:
                raise SchemaError(path, "pattern: unbalanced '['")
            body.append(_class_escape(p[j + 1], path))
            j += 2
            continue
        if p[j] == '"':
            raise SchemaError(path, "pattern: quotes in a string are not supported")
        body.append(p[j])
        j += 1
    if j >= n:
        raise SchemaError(path, "pattern: unbalanced '['")
    if neg:
        return "[^" + "".join(body) + _UNSAFE_IN_CLASS + "]", j + 1
    return "[" + "".join(body) + "]", j + 1


def _class_escape(e: str, path: str) -> str:
    """The converter's form of the escape ``\\e`` inside a class."""
    if e in _CLASS_ESCAPES:
        return _CLASS_ESCAPES[e]
    if e in "]\\-^.[":
        if e == "\\":
            raise SchemaError(path, "pattern: backslashes in a string are not supported")
        return "\\" + e
    raise SchemaError(path, f"pattern: the escape '\\{e}' in a class is not supported")


def _pattern_literal(c: str, path: str) -> str:
    """A character outside classes, escapes and groups, as itself; refuses what a JSON string can't hold raw."""
    if c in "^$":
        raise SchemaError(path, "pattern: anchors are supported only at the start and the end")
    if c == '"':
        raise SchemaError(path, "pattern: quotes in a string are not supported")
    if ord(c) < 0x20 or c == "\x7f":
        raise SchemaError(path, "pattern: control characters are not supported")
    return c


class _Converter(SchemaConverter):
    """llama-cpp-python's converter with JSON-safe strings and ``{}`` as any value."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _add_rule(self, name, rule):
        if name == "dot":
            rule = _SAFE_DOT
        return super()._add_rule(name, rule)

    def _add_primitive(self, name: str, rule: BuiltinRule):
        if name == "char":
            rule = BuiltinRule(_SAFE_CHAR, [])
        return super()._add_primitive(name, rule)

    def visit(self, schema, name):
        if schema == {}:
            return self._add_primitive("value", PRIMITIVE_RULES["value"])
        if schema.get("type") == "integer" and ("minimum" in schema or "maximum" in schema):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            body = _gbnf(_int_range(schema.get("minimum"), schema.get("maximum")))
            return self._add_rule(rule_name, f"({body}) space")
        return super().visit(schema, name)


# -- integers within bounds ------------------------------------------------------------------------
# A range is a list of alternatives, each a list of atoms: ("lit", text), ("cls", lo, hi) a digit
# class, ("rep", k) k digits, ("rep", k, m) k..m digits, ("alt", alternatives). Numbers are
# written as JSON writes them: no leading zeros, no "-0".

def _same_length(lo: str, hi: str) -> list:
    """Digit strings of one length from ``lo`` to ``hi``."""
    n = len(lo)
    if n == 1:
        return [[("cls", lo, hi)]]
    if lo[0] == hi[0]:
        return [[("lit", lo[0]), ("alt", _same_length(lo[1:], hi[1:]))]]
    out = [[("lit", lo[0]), ("alt", _same_length(lo[1:], "9" * (n - 1)))]]
    a, b = int(lo[0]) + 1, int(hi[0]) - 1
    if a <= b:
        out.append([("cls", str(a), str(b)), ("rep", n - 1)])
    out.append([("lit", hi[0]), ("alt", _same_length("0" * (n - 1), hi[1:]))])
    return out


def _positive(lo: int, hi: int | None) -> list:
    """Integers in [lo, hi] (lo >= 1; hi None: up to 16 digits)."""
    lo_s = str(lo)
    if hi is not None and len(str(hi)) == len(lo_s):
        return _same_length(lo_s, str(hi))
    out = _same_length(lo_s, "9" * len(lo_s))
    if hi is None:
        out.append([("cls", "1", "9"), ("rep", len(lo_s), 15)])
        return out
    hi_s = str(hi)
    if len(hi_s) > len(lo_s) + 1:
        out.append([("cls", "1", "9"), ("rep", len(lo_s), len(hi_s) - 2)])
    return out + _same_length("1" + "0" * (len(hi_s) - 1), hi_s)


def _int_range(lo: int | None, hi: int | None) -> list:
    out = []
    if lo is None or lo < 0:                                 # -m for m in [max(1, -hi), -lo]
        m_lo = 1 if hi is None or hi >= 0 else -hi
        out += [[("lit", "-")] + alt for alt in _positive(m_lo, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        if lo is None or lo <= 0:
            out.append([("lit", "0")])
        p_lo = max(1, lo if lo is not None else 1)
        if hi is None or hi >= p_lo:
            out += _positive(p_lo, hi)
    return out


def _gbnf(alts: list) -> str:
    def atom(a: tuple) -> str:
        if a[0] == "lit":
            return f'"{a[1]}"'
        if a[0] == "cls":
            return f"[{a[1]}]" if a[1] == a[2] else f"[{a[1]}-{a[2]}]"
        if a[0] == "rep":
            lo, hi = a[1], a[2] if len(a) > 2 else a[1]
            return "" if hi == 0 else f"[0-9]{{{lo}}}" if lo == hi else f"[0-9]{{{lo},{hi}}}"
        return "(" + _gbnf(a[1]) + ")"
    return " | ".join(" ".join(x for x in (atom(a) for a in alt) if x) for alt in alts)


def _rename_defs(schema: dict, prefix: str) -> dict:
    """Definitions named after their schema (the converter names a reference's rule by the
    definition's name alone: two tools' ``$defs/Item`` must not share one rule)."""
    def ref(r: str) -> str:
        head, _, name = r.rpartition("/")
        return f"{head}/{prefix}-{name}"

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        return {k: (ref(v) if k == "$ref" and isinstance(v, str) else walk(v)) for k, v in node.items()}

    out = walk(schema)
    for defs in ("$defs", "definitions"):
        if isinstance(out.get(defs), dict):
            out[defs] = {f"{prefix}-{k}": v for k, v in out[defs].items()}
    return out


class GrammarBuilder:
    """One GBNF grammar from several JSON schemas (a reply format and tool arguments):
    each :meth:`schema` gets rules of its own; :meth:`grammar` adds the root rule."""

    def __init__(self) -> None:
        self._conv = _Converter()
        self._roots: dict[str, Any] = {}

    def schema(self, schema: Any, name: str, path: str) -> str:
        """The rule name of a value matching ``schema`` (checked first: SchemaError)."""
        checker = _Checker(schema)
        checked = _rename_defs(checker.check(schema, ""), name)
        try:
            # references resolve against the checked copy (its $defs are checked too)
            resolved = self._conv.resolve_refs(checked, f"kv3d:{name}")
            return self._conv.visit(resolved, name)
        except SchemaError:
            raise
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SchemaError(path, f"the schema cannot be turned into a grammar: {exc}") from exc

    def literal(self, text: str) -> str:
        return self._conv._format_literal(text)

    def rule(self, name: str, body: str) -> str:
        return self._conv._add_rule(name, body)

    def primitive(self, name: str) -> str:
        return self._conv._add_primitive(name, PRIMITIVE_RULES[name])

    def grammar(self, root_body: str) -> str:
        self._conv._rules["root"] = root_body
        return self._conv.format_grammar()


def schema_rule(builder: GrammarBuilder, schema: Any, name: str, path: str) -> str:
    """:meth:`GrammarBuilder.schema` with ``path`` prefixed to any error."""
    try:
        return builder.schema(schema, name, path)
    except SchemaError as exc:
        raise SchemaError(_join(path, exc.path) if exc.path else path, exc.detail) from exc


def response_format_rule(builder: GrammarBuilder, response_format: Any) -> str | None:
    """The rule of a reply in ``response_format`` (None: free text). ``response_format``
    is the validated request model (``type`` text | json_object | json_schema)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return builder.schema({"type": "object"}, "json-object", "response_format")
    js = response_format.json_schema
    schema = js.schema_ if js.schema_ is not None else {"type": "object"}
    return schema_rule(builder, schema, "answer", "response_format.json_schema.schema")
