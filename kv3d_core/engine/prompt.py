"""Chat prompts: canonical messages, the model's chat template in a sandbox,
tokens, and the family boundary.

A GGUF's chat template is untrusted input (CVE-2024-34359 was template
injection in llama-cpp-python), so it runs in Jinja's immutable sandbox with
only the globals chat templates need.

**User text is data.** Only the template's own text is tokenized with special-token
parsing on. Message content (and the JSON the template writes with ``tojson``: tool
definitions, tool-call arguments) is tokenized with it off, so ``<|im_end|>`` typed
by a user stays the literal characters ``<``, ``|``, ... and can never close a turn
or forge another role's message. The template is rendered with a nonce-keyed
placeholder in place of each piece of data; the rendered text is cut at the
placeholders and each piece is tokenized as what it is (template: special parsing
on; data: off). Whitespace sentinels around each content placeholder show whether
the template trims content, and the spliced text is checked against a plain render
of the same messages: a template that transforms content some other way falls back
to a whole-text tokenization, which is refused (400) if any data holds control-token
text. Neither llama-server nor vLLM does this; both parse special tokens anywhere
in the rendered prompt.

The *family boundary* is the number of leading tokens that belong to the
system/developer messages and tool definitions. It is found without knowing the
template's syntax: render the system part followed by a probe message of the next
role; the tokens before the probe's content are the family's.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kv3d_core.contracts.backend import ModelInfo

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILY_ROLES = ("system", "developer")
_PROBE_A = "\u2063kv3d-probe-a\u2063"
_PROBE_B = "\u2064kv3d-probe-b\u2064"


class TemplateError(ValueError):
    """The chat template failed on these messages (shown to the client as a 400)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# The data collector of the render in progress (None for a plain render): ``tojson``
# output is data, so during a spliced render it becomes a placeholder too.
_SPLICE: contextvars.ContextVar["_Splice | None"] = contextvars.ContextVar("kv3d_splice", default=None)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    splice = _SPLICE.get()
    return splice.placeholder(text, "j") if splice is not None else text


_PAD_L, _PAD_R = "\n ", " \n"          # around content placeholders: do they survive the template?


class _Splice:
    """Placeholders for the data of one render, keyed by a nonce the data cannot know."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.data: list[str] = []
        self.pattern = re.compile(
            "(?P<l>\n )?\ue000" + self.nonce + "c(?P<c>\\d+)\ue001(?P<r> \n)?"
            "|\ue000" + self.nonce + "j(?P<j>\\d+)\ue001")

    def placeholder(self, text: str, kind: str) -> str:
        self.data.append(text)
        return f"\ue000{self.nonce}{kind}{len(self.data) - 1}\ue001"

    def content(self, text: str) -> str:
        return _PAD_L + self.placeholder(text, "c") + _PAD_R

    def segments(self, rendered: str) -> list[tuple[str, bool]]:
        """``rendered`` cut into (text, is_data) pieces, placeholders replaced by their data
        (trimmed on the sides where the template trimmed the sentinels)."""
        out: list[tuple[str, bool]] = []
        pos = 0
        for m in self.pattern.finditer(rendered):
            if m.start() > pos:
                out.append((rendered[pos:m.start()], False))
            if m.group("j") is not None:
                text = self._expand(self.data[int(m.group("j"))])
            else:
                text = self.data[int(m.group("c"))]
                if m.group("l") is None:
                    text = text.lstrip()
                if m.group("r") is None:
                    text = text.rstrip()
            if text:
                out.append((text, True))
            pos = m.end()
        if pos < len(rendered):
            out.append((rendered[pos:], False))
        return out

    def _expand(self, text: str) -> str:
        # JSON written by tojson may hold content placeholders (a template dumping a message):
        # all of it is data; sentinels inside JSON are escaped, so such a render fails the check
        return self.pattern.sub(lambda m: self.data[int(m.group("c") or m.group("j"))], text)

    def leaked(self, text: str) -> bool:
        return ("\ue000" + self.nonce) in text


def _data_message(m: dict, splice: _Splice) -> dict:
    """A copy of message ``m`` whose data (content, tool-call arguments) are placeholders."""
    out = dict(m)
    c = m.get("content")
    if isinstance(c, str) and c:
        out["content"] = splice.content(c)
    calls = m.get("tool_calls")
    if isinstance(calls, list):
        new_calls = []
        for call in calls:
            call = dict(call) if isinstance(call, dict) else call
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) and fn["arguments"]:
                fn = dict(fn)
                fn["arguments"] = splice.placeholder(fn["arguments"], "j")
                call["function"] = fn
            new_calls.append(call)
        out["tool_calls"] = new_calls
    return out


def _message_data(m: dict) -> list[str]:
    """The data strings of a message (what a user or tool wrote)."""
    out = [m["content"]] if isinstance(m.get("content"), str) and m["content"] else []
    for call in m.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out += [v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str) and v]
    out += [v for k, v in m.items() if k in ("name", "tool_call_id") and isinstance(v, str) and v]
    return out


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    tokens: list[int]
    family_len: int


class UnsafeContent(TemplateError):
    """Data holds control-token text the template's way of rendering cannot keep literal."""


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _common_token_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatPrompter:
    """Renders canonical messages with the model's template and tokenizes them.

    ``tokenize`` is the backend's (thread-safe) tokenizer. Instances are
    thread-safe: the API renders on worker threads.
    """

    def __init__(self, info: ModelInfo, tokenize: Callable[..., list[int]], template: str | None = None,
                 control_tokens: dict[str, int] | None = None) -> None:
        self.info = info
        self._tokenize = tokenize
        # template text is split at these marker strings (longest first, as llama.cpp does)
        self._control = dict(control_tokens or {})
        self._control_re = (re.compile("|".join(re.escape(t) for t in sorted(self._control, key=len, reverse=True)))
                            if self._control else None)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
            undefined=jinja2.Undefined,
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        source = template or info.chat_template or CHATML_TEMPLATE
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not compile: {exc}") from exc
        self._family_cache: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_backend(cls, backend, template: str | None = None) -> "ChatPrompter":
        """The prompter of a backend's model (its tokenizer and control-token list)."""
        return cls(backend.info, backend.tokenize, template, control_tokens=backend.control_tokens())

    def render(self, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token,
                eos_token=self.info.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"the chat template attempted an unsafe operation: {exc}") from exc
        except Exception as exc:  # templates fail in many ways on odd inputs
            raise TemplateError(f"the chat template failed on these messages: {exc}") from exc

    def _add_bos(self, text: str) -> bool:
        return bool(self.info.add_bos and not (self.info.bos_token and text.startswith(self.info.bos_token)))

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a rendered prompt, special tokens parsed anywhere (BOS added when
        the model wants one and the template did not write it). Only for text that holds
        no user data, or whose data was checked to hold no control-token text."""
        return self._tokenize(text, add_special=self._add_bos(text), parse_special=True)

    def tokenize_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Tokens of a spliced render: control tokens only where the template wrote them.

        With the backend's control-token list, template text is cut at its markers and the
        runs between markers -- template text and data joined -- are tokenized with special
        parsing off: the same tokens as the whole text with parsing on, as long as the data
        holds no marker text, and that text stays literal when it does. Without the list,
        each template piece is tokenized with parsing on and each data piece with it off."""
        tokens: list[int] = []
        if segments and self._add_bos(segments[0][0] if not segments[0][1] else ""):
            tokens += self._tokenize("", add_special=True, parse_special=False)[:1]
        if self._control_re is None:
            for text, is_data in segments:
                tokens += self._tokenize(text, add_special=False, parse_special=not is_data)
            return tokens
        run: list[str] = []

        def flush() -> None:
            if run:
                tokens.extend(self._tokenize("".join(run), add_special=False, parse_special=False))
                run.clear()

        for text, is_data in segments:
            if is_data:
                run.append(text)
                continue
            pos = 0
            for m in self._control_re.finditer(text):
                run.append(text[pos:m.start()])
                flush()
                tokens.append(self._control[m.group(0)])
                pos = m.end()
            run.append(text[pos:])
        flush()
        return tokens

    def has_control_text(self, text: str) -> bool:
        """Whether ``text`` would hold special tokens if tokenized with special parsing on."""
        return self._tokenize(text, add_special=False, parse_special=True) != \
            self._tokenize(text, add_special=False, parse_special=False)

    def render_spliced(self, messages: list[dict], *, tools: list | None = None,
                       add_generation_prompt: bool = True) -> tuple[str, list[tuple[str, bool]] | None]:
        """(plain render, its segments); segments is None when the template transforms data
        in a way the splice cannot follow (then only the plain render is trustworthy)."""
        plain = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        splice = _Splice()
        token = _SPLICE.set(splice)
        try:
            rendered = self.render([_data_message(m, splice) for m in messages], tools=tools,
                                   add_generation_prompt=add_generation_prompt)
        except TemplateError:
            return plain, None
        finally:
            _SPLICE.reset(token)
        segments = splice.segments(rendered)
        if "".join(t for t, _ in segments) != plain or any(splice.leaked(t) for t, _ in segments):
            return plain, None
        return plain, segments

    def _tokens_of(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> tuple[str, list[int]]:
        text, segments = self.render_spliced(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        if segments is not None:
            return text, self.tokenize_segments(segments)
        # The template rewrites data (not just trimming): tokenize the whole text, which is safe
        # only while no piece of data holds control-token text.
        data = [d for m in messages for d in _message_data(m)]
        if tools:
            data.append(json.dumps(tools, ensure_ascii=False))
        for d in data:
            if self.has_control_text(d):
                raise UnsafeContent(
                    "a message holds control-token text (such as the template's own turn markers), and this "
                    "model's chat template rewrites message content in a way that cannot keep it literal; "
                    "remove it from the message")
        return text, self.tokenize_prompt(text)

    def _family_tokens(self, family: list[dict], tools: list | None, next_role: str | None) -> list[int]:
        key = json.dumps([family, tools, next_role], sort_keys=True, ensure_ascii=False)
        with self._lock:
            hit = self._family_cache.get(key)
        if hit is not None:
            return hit
        try:
            if next_role is None:
                _, tokens = self._tokens_of(family, tools, add_generation_prompt=False)
            else:
                tokens = self._probe_family_tokens(family, tools, next_role)
        except TemplateError:
            tokens = []
        with self._lock:
            if len(self._family_cache) > 1024:
                self._family_cache.clear()
            self._family_cache[key] = tokens
        return tokens

    def _probe_family_tokens(self, family: list[dict], tools: list | None, next_role: str) -> list[int]:
        """Tokens of the family messages and the next message's opening markup: render them
        with a probe message and keep what comes before the probe's content."""
        _, segments = self.render_spliced(family + [{"role": next_role, "content": _PROBE_A}], tools=tools,
                                          add_generation_prompt=False)
        if segments is not None:
            for i in range(len(segments) - 1, -1, -1):
                if segments[i] == (_PROBE_A, True):
                    return self.tokenize_segments(segments[:i])
        # fallback: the text two different probes share (checked for control text like a prompt)
        a = self.render(family + [{"role": next_role, "content": _PROBE_A}], tools=tools, add_generation_prompt=False)
        b = self.render(family + [{"role": next_role, "content": _PROBE_B}], tools=tools, add_generation_prompt=False)
        text = _common_prefix(a, b)
        _, tokens = self._tokens_of(family, tools, add_generation_prompt=False)   # raises on control text
        return self.tokenize_prompt(text) if text else tokens[:0]

    def chat(self, messages: list[dict], tools: list | None = None) -> RenderedPrompt:
        text, tokens = self._tokens_of(messages, tools, add_generation_prompt=True)
        n_family = 0
        while n_family < len(messages) and messages[n_family].get("role") in FAMILY_ROLES:
            n_family += 1
        next_role = messages[n_family]["role"] if n_family < len(messages) else None
        family_len = _common_token_prefix(self._family_tokens(messages[:n_family], tools, next_role), tokens)
        return RenderedPrompt(text, tokens, family_len)

    def completion(self, prompt: str | list[int]) -> RenderedPrompt:
        """A raw completion prompt: no template, no family (boundary 0)."""
        if isinstance(prompt, str):
            return RenderedPrompt(prompt, self._tokenize(prompt, add_special=self.info.add_bos, parse_special=False), 0)
        return RenderedPrompt("", list(prompt), 0)

