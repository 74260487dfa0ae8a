"""Tool calling: tools through the model's chat template, grammars that force a call, and
tool calls parsed out of the model's text (whole, or streamed as OpenAI's deltas).

**Formats**, chosen from the chat template (:func:`detect_format`):

========  ============================================================  =======================
format    what the model writes                                         recognised by
========  ============================================================  =======================
hermes    ``<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>``  ``<tool_call>`` in the
          (Hermes 2 Pro, Qwen2.5, Qwen3), after optional text           template
llama3    ``{"name": .., "parameters": {..}}`` as the whole reply         ``<|python_tag|>`` or
          (Llama 3.1-3.3 JSON tool calling)                              ``ipython`` + headers
mistral   ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]``          ``[TOOL_CALLS]``
generic   ``{"tool_calls": [{"name": .., "arguments": {..}}, ..]}``      anything else
========  ============================================================  =======================

A template of a native format renders the tools, the assistant's calls and the tool
results itself (arguments passed as objects or strings, whichever the template renders as
JSON: probed once per model). For the generic format (templates that know nothing of tools,
such as SmolLM2's) kv3d writes the tools and the reply format into the system message and
turns earlier calls and results into message text. Either way tool definitions and
arguments reach the tokenizer as data, never as control tokens (``engine/prompt.py``); a
template that writes them out raw is covered by refusing definitions or arguments that hold
control-token text.

``tool_choice``: ``none`` -- replies are plain text (the generic format then leaves the tools
out of the prompt: it would only ask for calls nobody reads); ``auto`` -- the model decides, its
text is parsed; ``required`` and a named function -- a grammar admits only well-formed calls to
the allowed tools, whose arguments match their JSON schemas, so even a 135M model emits a valid
call. A named function is called once; ``parallel_tool_calls: false`` admits one call.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from kv3d_core.api.structured import GrammarBuilder, SchemaError, schema_rule

FORMATS = ("hermes", "llama3", "mistral", "generic")
_PROBE_FN = "kv3d_probe_fn"
_PROBE_ARGS = {"kv3d_arg": "kv3d_val"}
_PROBE_RESULT = "kv3d_probe_result"
_ALNUM = string.ascii_letters + string.digits


def detect_format(template: str | None) -> str:
    """The tool-call format of a chat template (see the module docstring)."""
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "ipython" in t):
        return "llama3"
    return "generic"


class ToolError(ValueError):
    """A request's tools or tool turns cannot be used (a 400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template does with tools, found by rendering probes."""

    renders_tools: bool
    arguments: str            # "string" | "object" | "none": how tool-call arguments render as JSON
    tool_role: bool           # tool results (role "tool") appear in the prompt


def generic_system_text(tools: list[dict], mode: str, parallel: bool | None) -> str:
    """What the generic format adds to the system message."""
    listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    one = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    lines = [f"You can call these tools (JSON schemas of their arguments): {listing}",
             f"To call tools, reply with this JSON object and nothing else: {one}"]
    if parallel is False:
        lines.append("Call at most one tool per reply.")
    if mode == "required":
        lines.append("You must call a tool in this reply.")
    elif mode.startswith("function:"):
        lines.append(f"You must call the tool '{mode.split(':', 1)[1]}' in this reply.")
    else:
        lines.append("Otherwise answer in plain text.")
    return "\n".join(lines)


class ToolSupport:
    """Tool handling for one model's chat template. Thread-safe."""

    def __init__(self, prompter, template: str | None) -> None:
        self.prompter = prompter
        self.format = detect_format(template)
        self._caps: TemplateCaps | None = None
        self._lock = threading.Lock()

    # -- the template -----------------------------------------------------------------------
    def caps(self) -> TemplateCaps:
        with self._lock:
            if self._caps is None:
                self._caps = self._probe()
            return self._caps

    def _render(self, messages: list[dict], tools: list | None = None) -> str | None:
        try:
            return self.prompter.render(messages, tools=tools, add_generation_prompt=False)
        except Exception:        # a template may refuse the probe in its own way
            return None

    def _probe(self) -> TemplateCaps:
        tool = {"type": "function", "function": {"name": _PROBE_FN, "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
        user = {"role": "user", "content": "hi"}
        with_tools = self._render([user], [tool]) or ""
        renders_tools = _PROBE_FN in with_tools and _PROBE_FN not in (self._render([user]) or "")
        pair = '"kv3d_arg": "kv3d_val"'

        def call(args: Any) -> dict:
            return {"role": "assistant", "content": "", "tool_calls": [
                {"id": "abcdefghi", "type": "function", "function": {"name": _PROBE_FN, "arguments": args}}]}

        arguments = "none"
        as_string = self._render([user, call(json.dumps(_PROBE_ARGS))], [tool]) or ""
        as_object = self._render([user, call(dict(_PROBE_ARGS))], [tool]) or ""
        if pair in as_string and '\\"kv3d_arg' not in as_string:
            arguments = "string"
        elif pair in as_object:
            arguments = "object"
        result = self._render([user, call(json.dumps(_PROBE_ARGS) if arguments != "object" else dict(_PROBE_ARGS)),
                               {"role": "tool", "tool_call_id": "abcdefghi", "content": _PROBE_RESULT}], [tool]) or ""
        return TemplateCaps(renders_tools, arguments, _PROBE_RESULT in result)

    @property
    def effective_format(self) -> str:
        """The format replies are parsed in: the template's own when it renders tools."""
        if self.format != "generic" and self.caps().renders_tools:
            return self.format
        return "generic"

    # -- requests -----------------------------------------------------------------------------
    def prepare(self, messages: list[dict], tools: list[dict] | None, mode: str | None,
                parallel: bool | None) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) to render for a request: tool turns in the form the template
        takes, and for the generic format the tools in the system message. Raises
        :class:`ToolError` for what cannot be rendered safely."""
        has_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not tools and not has_turns:
            return messages, None
        fmt = self.effective_format
        if fmt == "generic":                 # the tools go into message content: data, whatever they hold
            return self._prepare_generic(messages, tools, mode or "auto", parallel), None
        # a native template may write definitions out as its own text (not through tojson)
        if tools and self.prompter.has_control_text(json.dumps(tools, ensure_ascii=False)):
            raise ToolError("tools", "tool definitions hold control-token text (such as the chat template's own "
                                     "markers); remove it")
        caps = self.caps()
        out = []
        ids = _mistral_ids(messages) if fmt == "mistral" else {}
        for i, m in enumerate(messages):
            m = dict(m)
            if m.get("tool_calls"):
                calls = []
                for j, c in enumerate(m["tool_calls"]):
                    fn = dict(c["function"])
                    if caps.arguments == "object":
                        fn["arguments"] = self._object_arguments(fn["arguments"], f"messages.{i}.tool_calls.{j}")
                    calls.append({**c, "id": ids.get(c["id"], c["id"]), "function": fn})
                m["tool_calls"] = calls
            if m["role"] == "tool" and m.get("tool_call_id") in ids:
                m["tool_call_id"] = ids[m["tool_call_id"]]
            out.append(m)
        return out, tools

    def _object_arguments(self, arguments: str, where: str) -> dict:
        try:
            obj = json.loads(arguments)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise ToolError(f"{where}.function.arguments", "tool-call arguments must be a JSON object for this "
                                                           "model's chat template")
        if self.prompter.has_control_text(arguments):
            raise ToolError(f"{where}.function.arguments", "tool-call arguments hold control-token text; remove it")
        return obj

    def _prepare_generic(self, messages: list[dict], tools: list[dict] | None, mode: str,
                         parallel: bool | None) -> list[dict]:
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
        tool_role = self.caps().tool_role
        out: list[dict] = []
        for m in messages:
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    try:
                        args = json.loads(c["function"]["arguments"])
                    except json.JSONDecodeError:
                        args = c["function"]["arguments"]
                    calls.append({"name": c["function"]["name"], "arguments": args})
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
                if m.get("content"):
                    text = m["content"] + "\n" + text
                out.append({"role": "assistant", "content": text})
            elif m["role"] == "tool":
                if tool_role:
                    out.append(m)
                    continue
                body = json.dumps({"tool_response": {"name": names.get(m.get("tool_call_id"), ""),
                                                     "content": m.get("content", "")}}, ensure_ascii=False)
                if out and out[-1].get("kv3d_tool_results"):
                    out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + body}
                else:
                    out.append({"role": "user", "content": body, "kv3d_tool_results": True})
            else:
                out.append(m)
        out = [{k: v for k, v in m.items() if k != "kv3d_tool_results"} for m in out]
        if tools and mode != "none":
            text = generic_system_text(tools, mode, parallel)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + text) if out[0]["content"] else text}
            else:
                out.insert(0, {"role": "system", "content": text})
        return out

    # -- grammars -------------------------------------------------------------------------------
    def calls_rule(self, builder: GrammarBuilder, tools: list[dict], mode: str, parallel: bool | None) -> str:
        """The grammar rule of a reply made of tool calls only (``required`` or a named function)."""
        fmt = self.effective_format
        names = [t["function"]["name"] for t in tools]
        if mode.startswith("function:"):
            names = [mode.split(":", 1)[1]]
        args_key = "parameters" if fmt == "llama3" else "arguments"
        space = "space"
        alts = []
        for i, t in enumerate(tools):
            name = t["function"]["name"]
            if name not in names:
                continue
            params = t["function"].get("parameters") or {"type": "object", "properties": {}}
            args = schema_rule(builder, params, f"tool-{i}-args", f"tools.{i}.function.parameters")
            alts.append(builder.rule(
                f"tool-{i}-call",
                f'"{{" {space} {builder.literal(json.dumps("name"))} {space} ":" {space} '
                f'{builder.literal(json.dumps(name))} {space} "," {space} '
                f'{builder.literal(json.dumps(args_key))} {space} ":" {space} {args} "}}" {space}'))
        call = builder.rule("tool-call", " | ".join(alts))
        # a named function is one call (as OpenAI and vLLM do); Llama 3's format has one call a reply
        many = parallel is not False and not mode.startswith("function:") and fmt != "llama3"
        if fmt == "hermes":
            one = builder.rule("tool-call-block", f'"<tool_call>\\n" {call} "\\n</tool_call>"')
            return builder.rule("tool-calls", f'{one} ("\\n" {one})*' if many else one)
        if fmt == "llama3":
            return call
        seq = f'"[" {space} {call} ("," {space} {call})* "]"' if many else f'"[" {space} {call} "]"'
        if fmt == "mistral":
            return builder.rule("tool-calls", f'"[TOOL_CALLS]" {seq}')
        return builder.rule("tool-calls", f'"{{" {space} {builder.literal(json.dumps("tool_calls"))} {space} ":" '
                                          f'{space} {seq} {space} "}}" {space}')

    # -- replies ----------------------------------------------------------------------------------
    def parser(self, tools: list[dict], parallel: bool | None, mode: str = "auto") -> "ToolCallParser":
        fmt = self.effective_format
        if mode.startswith("function:"):
            parallel = False
        return ToolCallParser(fmt, {t["function"]["name"] for t in tools}, parallel,
                              new_call_id if fmt != "mistral" else new_mistral_id)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def new_mistral_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))       # Mistral's templates take 9 characters


def _mistral_ids(messages: list[dict]) -> dict[str, str]:
    """Mistral's templates refuse ids that are not 9 alphanumerics: map others to such ids
    (a digest, so a call and its result keep matching)."""
    out = {}
    for m in messages:
        for c in m.get("tool_calls") or []:
            cid = c["id"]
            if not (len(cid) == 9 and cid.isalnum()):
                out[cid] = hashlib.blake2b(cid.encode(), digest_size=8).hexdigest()[:9]
    return out


# -- parsing --------------------------------------------------------------------------------------

@dataclass
class _Call:
    name: str | None = None
    id: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_string: bool = False          # arguments written as a JSON string holding JSON
    complete: bool = False


class _JsonScan:
    """An incremental scanner of one JSON value, starting at ``start`` of a growing text;
    records the call objects found at ``call_path`` (keys; ``*`` for any array element)."""

    _SCALAR = set("0123456789+-.eEtrufalsn")

    def __init__(self, start: int, call_path: tuple, args_keys: tuple[str, ...]) -> None:
        self.pos = start
        self.call_path = call_path
        self.args_keys = args_keys
        self.stack: list[dict] = []
        self.done = False
        self.error = False
        self.end: int | None = None
        self.calls: list[_Call] = []
        self.root_first_key: str | None = None
        self._str_start: int | None = None
        self._str_role: str | None = None          # "key" | "value"
        self._esc = False
        self._scalar_start: int | None = None
        self._started = False

    def _value_path(self) -> tuple:
        if not self.stack:
            return ()
        f = self.stack[-1]
        return f["path"] + ((f["key"],) if f["kind"] == "{" else ("*",))

    def _value_started(self, i: int, first: str) -> None:
        f = self.stack[-1] if self.stack else None
        if f is not None and f["call"] is not None and f["kind"] == "{":
            if f["key"] in self.args_keys and f["call"].args_start is None:
                f["call"].args_start = i
                f["call"].args_string = first == '"'

    def _value_ended(self, i: int, start: int) -> None:
        """A value that began at ``start`` ended just before ``i``."""
        if not self.stack:
            self.done, self.end = True, i
            return
        f = self.stack[-1]
        f["state"] = "comma_or_end"
        call = f["call"]
        if call is not None and f["kind"] == "{" and call.args_start == start:
            call.args_end = i

    def feed(self, text: str) -> None:
        """Scans ``text`` (the text so far) on from where the last call stopped."""
        n = len(text)
        i = self.pos
        # each step returns the index to read next: the same one where the character is to be
        # read again in a new state, or where scanning stopped on an error
        while i < n and not self.done and not self.error:
            if self._str_start is not None:
                i = self._string_char(text, i)
            elif self._scalar_start is not None:
                i = self._scalar_char(text, i)
            elif text[i] in " \t\r\n":
                i += 1
            else:
                i = self._structural_char(text[i], i)
        self.pos = i

    def _string_char(self, text: str, i: int) -> int:
        """Reads ``text[i]`` inside a string (a key or a value)."""
        c = text[i]
        if self._esc:
            self._esc = False
        elif c == "\\":
            self._esc = True
        elif c == '"':
            start, role = self._str_start, self._str_role
            self._str_start = None
            try:
                value = json.loads(text[start:i + 1])
            except json.JSONDecodeError:
                self.error = True
                return i
            if role == "key":
                self._key_ended(value)
            else:
                self._string_value_ended(value, i, start)
        return i + 1

    def _key_ended(self, key: str) -> None:
        """An object key was read: a colon comes next."""
        f = self.stack[-1]
        f["key"], f["state"] = key, "colon"
        if len(self.stack) == 1 and self.root_first_key is None:
            self.root_first_key = key

    def _string_value_ended(self, value: str, i: int, start: int) -> None:
        """A string value ended at ``text[i]``: a call's name or id where it sits there."""
        f = self.stack[-1] if self.stack else None
        if f is not None and f["call"] is not None and f["kind"] == "{":
            if f["key"] == "name" and isinstance(value, str):
                f["call"].name = value
            elif f["key"] == "id" and isinstance(value, str):
                f["call"].id = value
        self._value_ended(i + 1, start)

    def _scalar_char(self, text: str, i: int) -> int:
        """Reads ``text[i]`` inside a number or literal; a character that ends one is read again."""
        if text[i] in self._SCALAR:
            return i + 1
        start, self._scalar_start = self._scalar_start, None
        try:
            json.loads(text[start:i])
        except json.JSONDecodeError:
            self.error = True
            return i
        self._value_ended(i, start)
        return i                                                  # this character again, in the new state

    def _structural_char(self, c: str, i: int) -> int:
        """Reads ``c``, outside strings and scalars, in the state of the innermost container."""
        f = self.stack[-1] if self.stack else None
        state = f["state"] if f else ("value" if not self._started else "end")
        if state in ("value", "value_or_end"):
            ok = self._at_value(c, i, state)
        elif state in ("key", "key_or_end"):
            ok = self._at_key(c, i, state)
        elif state == "colon":
            ok = c == ":"
            if ok:
                f["state"] = "value"
        elif state == "comma_or_end":
            ok = self._at_comma_or_end(c, i, f)
        else:
            ok = False
        if not ok:
            self.error = True
            return i
        return i + 1

    def _at_value(self, c: str, i: int, state: str) -> bool:
        """Reads ``c`` where a value (or, in an array, its end) may start; False: not JSON."""
        if c == "]" and state == "value_or_end":
            self._close(i)
        elif c in "{[":
            self._started = True
            self._open(c, i)
        elif c == '"':
            self._started = True
            self._value_started(i, c)
            self._str_start, self._str_role = i, "value"
        elif c in self._SCALAR:
            self._started = True
            self._value_started(i, c)
            self._scalar_start = i
        else:
            return False
        return True

    def _open(self, c: str, i: int) -> None:
        """An object or array opens at ``i``: a call where it sits at the call path."""
        path = self._value_path()
        self._value_started(i, c)
        call = None
        if c == "{" and self._matches(path):
            call = _Call()
            self.calls.append(call)
        self.stack.append({"kind": c, "state": "key_or_end" if c == "{" else "value_or_end",
                           "key": None, "path": path, "call": call, "start": i})

    def _at_key(self, c: str, i: int, state: str) -> bool:
        """Reads ``c`` where an object key (or the object's end) may start; False: not JSON."""
        if c == '"':
            self._str_start, self._str_role = i, "key"
        elif c == "}" and state == "key_or_end":
            self._close(i)
        else:
            return False
        return True

    def _at_comma_or_end(self, c: str, i: int, f: dict) -> bool:
        """Reads ``c`` after a value in the container ``f``; False: not JSON."""
        if c == ",":
            f["state"] = "key" if f["kind"] == "{" else "value"
        elif (c == "}" and f["kind"] == "{") or (c == "]" and f["kind"] == "["):
            self._close(i)
        else:
            return False
        return True

    def _close(self, i: int) -> None:
        f = self.stack.pop()
        if f["call"] is not None:
            f["call"].complete = True
        self._value_ended(i + 1, f["start"])

    def _matches(self, path: tuple) -> bool:
        return len(path) == len(self.call_path) and all(p == "*" and q == "*" or p == q
                                                        for p, q in zip(self.call_path, path))


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class _Block:
    """One tool-call region of the text: a JSON value the scanner reads."""
    scan: _JsonScan
    text_start: int                  # where the region's raw text starts (for a fallback to content)
    lead: bool = False               # opened by the reply's first character, not by a marker
    dropped: bool = False            # held calls past the first with parallel_tool_calls false
    emitted: dict[int, int] = field(default_factory=dict)   # call index in block -> args chars sent
    announced: dict[int, int] = field(default_factory=dict)  # call index in block -> global index


class ToolCallParser:
    """Tool calls out of a growing reply: :meth:`push` new text, get content text and
    :class:`ToolCallDelta` s to send; :meth:`finish` at the end. Content is sent as it
    comes, except text that may start a call (held until it is known); a call is announced
    once its name is complete and known, then its arguments stream as written."""

    def __init__(self, fmt: str, names: set[str], parallel: bool | None,
                 make_id: Callable[[], str] = new_call_id) -> None:
        if fmt not in FORMATS:
            raise ValueError(fmt)
        self.fmt = fmt
        self.names = names
        self.parallel = parallel
        self.make_id = make_id
        self.text = ""
        self.calls: list[ParsedCall] = []
        self._sent = 0                    # text up to here is decided (sent as content or read as calls)
        self._block: _Block | None = None
        self._lead_done = fmt == "hermes"     # the others' calls may open the reply with no visible marker
        self._marker = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(fmt)
        self._closing = "</tool_call>" if fmt == "hermes" else None

    # -- format specifics ---------------------------------------------------------------------
    def _new_scan(self, start: int) -> _JsonScan:
        path = {"hermes": (), "llama3": (), "mistral": ("*",), "generic": ("tool_calls", "*")}[self.fmt]
        keys = ("parameters", "arguments") if self.fmt == "llama3" else ("arguments",)
        return _JsonScan(start, path, keys)

    def _lead_ok(self, scan: _JsonScan) -> bool | None:
        """For a reply that opens with JSON: True (calls), False (content), None (not yet known)."""
        if scan.error:
            return False
        if self.fmt == "generic" and scan.root_first_key is not None and scan.root_first_key != "tool_calls":
            return False
        if self.fmt == "llama3" and scan.root_first_key is not None and scan.root_first_key not in ("name", "type"):
            return False
        named = [c for c in scan.calls if c.name is not None]
        if named:
            return named[0].name in self.names
        if scan.done:
            return False
        return None

    # -- driving ------------------------------------------------------------------------------------
    def push(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._block is not None:
                self._run_block(final, content, deltas)
                if self._block is not None:
                    break                   # waiting for more text
                continue
            rest = self.text[self._sent:]
            if not self._lead_done:
                stripped = rest.lstrip()
                if not stripped:
                    if final:
                        content.append(rest)
                        self._sent = len(self.text)
                    break
                self._lead_done = True
                if stripped[0] == ("[" if self.fmt == "mistral" else "{"):
                    start = self._sent + len(rest) - len(stripped)
                    self._block = _Block(self._new_scan(start), self._sent, lead=True)
                    continue
            k = rest.find(self._marker) if self._marker else -1
            if k >= 0:
                content.append(rest[:k])
                start = self._sent + k + len(self._marker)
                self._block = _Block(self._new_scan(start), self._sent + k)
                self._sent = start
                continue
            # hold back what may be the start of a marker
            keep = 0 if final or not self._marker else _partial_suffix(rest, self._marker)
            content.append(rest[:len(rest) - keep])
            self._sent += len(rest) - keep
            break
        text = "".join(content)
        if self.calls and not text.strip():
            text = ""                       # whitespace around calls is not content
        return text, deltas

    def _run_block(self, final: bool, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        b = self._block
        assert b is not None
        scan = b.scan
        scan.feed(self.text)
        if b.lead:
            ok = self._lead_ok(scan)
            if ok is False or (ok is None and final):
                self._abandon(content)
                return True
            if ok is None:
                return False
        for ci, call in enumerate(scan.calls):
            if ci not in b.announced:
                if call.name is None:
                    break                  # announced in order, once the name is complete
                if call.name not in self.names or (self.parallel is False and self.calls):
                    if not self.calls:
                        self._abandon(content)   # no call of a known tool: the text is content
                        return True
                    b.dropped = True        # an extra or unknown call after good ones: dropped
                    continue
                idx = len(self.calls)
                cid = call.id if call.id and self.fmt == "mistral" and len(call.id) == 9 and call.id.isalnum() \
                    else self.make_id()
                self.calls.append(ParsedCall(cid, call.name, ""))
                b.announced[ci] = idx
                b.emitted[ci] = 0
                deltas.append(ToolCallDelta(idx, id=cid, name=call.name))
            idx = b.announced[ci]
            args = self._args_text(call, final or scan.done)
            if args is not None and len(args) > b.emitted[ci]:
                piece = args[b.emitted[ci]:]
                b.emitted[ci] = len(args)
                self.calls[idx].arguments += piece
                deltas.append(ToolCallDelta(idx, arguments=piece))
        if scan.done or scan.error or final:
            if not b.announced and not b.dropped:
                self._abandon(content)
                return True
            for ci, idx in b.announced.items():
                if self.calls[idx].arguments == "" and scan.calls[ci].args_start is None:
                    self.calls[idx].arguments = "{}"
                    deltas.append(ToolCallDelta(idx, arguments="{}"))
            end = scan.end if scan.end is not None else len(self.text)
            if self._closing:
                tail = self.text[end:]
                stripped = tail.lstrip()
                if self._closing.startswith(stripped) and not final and len(stripped) < len(self._closing):
                    return False            # the closing tag may still come
                if stripped.startswith(self._closing):
                    end += len(tail) - len(stripped) + len(self._closing)
            self._sent = end
            self._block = None
            return True
        return False

    def _args_text(self, call: _Call, final: bool) -> str | None:
        if call.args_start is None:
            return None
        end = call.args_end if call.args_end is not None else len(self.text)
        raw = self.text[call.args_start:end]
        if call.args_string:                 # arguments written as a string holding JSON: sent when whole
            if call.args_end is None:
                return None
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                return raw
            return value if isinstance(value, str) else raw
        return raw

    def _abandon(self, content: list[str]) -> None:
        """The region was no tool call: its text is content."""
        b = self._block
        assert b is not None
        content.append(self.text[b.text_start:])
        self._sent = len(self.text)
        self._block = None
        self._lead_done = True


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def parse_reply(parser: ToolCallParser, text: str) -> tuple[str, list[ParsedCall]]:
    """A whole reply: (content, calls)."""
    a, _ = parser.push(text)
    b, _ = parser.finish()
    return a + b, parser.calls
