"""Chat prompts: canonical messages, the model's chat template in a sandbox,
tokens, and the family boundary.

A GGUF's chat template is untrusted input (CVE-2024-34359 was template
injection in llama-cpp-python), so it runs in Jinja's immutable sandbox with
only the globals chat templates need.

The *family boundary* is the number of leading tokens that belong to the
system/developer messages and tool definitions. It is found without knowing the
template's syntax: render the system part followed by two different probe
messages of the next role; the text both renders share is the family's text.
"""

from __future__ import annotations

import json
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


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    tokens: list[int]
    family_len: int


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

    def __init__(self, info: ModelInfo, tokenize: Callable[..., list[int]], template: str | None = None) -> None:
        self.info = info
        self._tokenize = tokenize
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
        self._family_cache: dict[str, str] = {}
        self._lock = threading.Lock()

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

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a rendered prompt (BOS added when the model wants one and the
        template did not write it)."""
        add_bos = self.info.add_bos and not (self.info.bos_token and text.startswith(self.info.bos_token))
        return self._tokenize(text, add_special=add_bos, parse_special=True)

    def _family_text(self, family: list[dict], tools: list | None, next_role: str | None) -> str:
        key = json.dumps([family, tools, next_role], sort_keys=True, ensure_ascii=False)
        with self._lock:
            hit = self._family_cache.get(key)
        if hit is not None:
            return hit
        try:
            if next_role is None:
                text = self.render(family, tools=tools, add_generation_prompt=False)
            else:
                a = self.render(family + [{"role": next_role, "content": _PROBE_A}], tools=tools, add_generation_prompt=False)
                b = self.render(family + [{"role": next_role, "content": _PROBE_B}], tools=tools, add_generation_prompt=False)
                text = _common_prefix(a, b)
        except TemplateError:
            text = ""
        with self._lock:
            if len(self._family_cache) > 1024:
                self._family_cache.clear()
            self._family_cache[key] = text
        return text

    def chat(self, messages: list[dict], tools: list | None = None) -> RenderedPrompt:
        text = self.render(messages, tools=tools, add_generation_prompt=True)
        tokens = self.tokenize_prompt(text)
        n_family = 0
        while n_family < len(messages) and messages[n_family].get("role") in FAMILY_ROLES:
            n_family += 1
        next_role = messages[n_family]["role"] if n_family < len(messages) else None
        fam_text = self._family_text(messages[:n_family], tools, next_role)
        family_len = 0
        if fam_text and text.startswith(fam_text):
            family_len = _common_token_prefix(self.tokenize_prompt(fam_text), tokens)
        return RenderedPrompt(text, tokens, family_len)

    def completion(self, prompt: str | list[int]) -> RenderedPrompt:
        """A raw completion prompt: no template, no family (boundary 0)."""
        if isinstance(prompt, str):
            return RenderedPrompt(prompt, self._tokenize(prompt, add_special=self.info.add_bos, parse_special=False), 0)
        return RenderedPrompt("", list(prompt), 0)

