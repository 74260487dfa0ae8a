"""Request bodies of the OpenAI endpoints, validated strictly (a string where a
number belongs is a 400, not a silent coercion). Unknown fields are ignored,
as OpenAI-compatible servers do; fields kv3d cannot honour are refused."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 4
INT32_MAX = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def canonical(self) -> dict[str, Any]:
        """The message as the chat template sees it. A one-part text array and a
        string are the same message; ``developer`` is rendered as ``system``."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content if content is not None else ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=INT32_MAX)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None
    cache_salt: Optional[str] = Field(default=None, max_length=1024)
    ignore_eos: bool = False     # vLLM's and llama-server's extension: generate to the limit (benchmarks)

    @model_validator(mode="after")
    def _check_stop(self) -> "_Sampling":
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"'stop' takes at most {MAX_STOP} strings")
        if any(not s for s in stops):
            raise ValueError("'stop' strings must not be empty")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    tools: Optional[list[dict[str, Any]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1, le=1)
    logprobs: Optional[int] = None

    @model_validator(mode="after")
    def _check_prompt(self) -> "CompletionRequest":
        p = self.prompt
        if isinstance(p, list):
            if not p:
                raise ValueError("'prompt' must not be empty")
            if isinstance(p[0], str) and len(p) != 1:
                raise ValueError("'prompt' as a list of strings takes exactly one string (batches are not supported)")
        elif p == "":
            raise ValueError("'prompt' must not be empty")
        return self

    @property
    def limit(self) -> Optional[int]:
        return self.max_tokens

    @property
    def prompt_value(self) -> Union[str, list[int]]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]
