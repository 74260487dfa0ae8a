"""Request bodies of the OpenAI endpoints, validated strictly: a string where a number
belongs is a 400, not a silent coercion, and **no field is accepted and ignored**. A field
this module does not know is a 400 naming it (``extra="forbid"``, nested objects too); a
field OpenAI defines that kv3d cannot honour (``audio``, ``store: true``, ``suffix``...) is
a 400 naming it unless it holds its no-op value (null, ``store: false``...). Limits that
need the model (vocabulary, context) are checked by the endpoints."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4
INT32_MAX = 2**31 - 1
MAX_N = 16                 # choices per prompt
MAX_PROMPTS = 32           # prompts per completions request
MAX_CHOICES = 64           # prompts x n
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
NAME_RE = r"^[a-zA-Z0-9_-]{1,64}$"
TOOL_CALL_ID_RE = r"^[A-Za-z0-9_.:-]{1,128}$"


def _unsupported(name: str, value: Any, *noop: Any) -> Any:
    if value is None or any(value == n and type(value) is type(n) for n in noop):
        return value
    raise PydanticCustomError("unsupported_parameter", "'{name}' is not supported by this server", {"name": name})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(pattern=NAME_RE)
    arguments: str


class ToolCall(_Strict):
    id: str = Field(pattern=TOOL_CALL_ID_RE)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = Field(default=None, max_length=256)
    tool_calls: Optional[list[ToolCall]] = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: Optional[str] = Field(default=None, pattern=TOOL_CALL_ID_RE)
    refusal: Optional[str] = None
    audio: Any = None
    function_call: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                t = part.get("type") if isinstance(part, dict) else None
                if isinstance(t, str) and t != "text":
                    raise PydanticCustomError("unsupported_parameter", "content parts of type '{t}' are not "
                                              "supported by this server (only 'text')", {"t": t, "field": f"{i}.type"})
        return v

    @field_validator("refusal", "audio", "function_call", mode="before")
    @classmethod
    def _unsupported_fields(cls, v: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, v)

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry 'tool_call_id'")
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
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: str
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _known(self) -> "ResponseFormat":
        if self.type not in ("text", "json_object", "json_schema"):
            raise PydanticCustomError("invalid_value", "unknown response_format type '{t}' (use 'text', "
                                      "'json_object' or 'json_schema')", {"t": self.type})
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema' and allowed only with it")
        return self


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
    logit_bias: Optional[dict[str, float]] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    user: Optional[str] = Field(default=None, max_length=512)   # an end-user id: kv3d keeps none, it changes nothing
    cache_salt: Optional[str] = Field(default=None, max_length=1024)
    # OpenAI fields kv3d cannot honour: a 400 naming them unless they hold their no-op value
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, v: Any) -> Any:
        return _unsupported("store", v, False)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        return _unsupported("metadata", v)

    @field_validator("service_tier", mode="before")
    @classmethod
    def _service_tier(cls, v: Any) -> Any:
        return _unsupported("service_tier", v, "auto", "default")

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for k, b in v.items():
            if not re.fullmatch(r"[0-9]{1,9}", k):
                raise PydanticCustomError("invalid_value", "keys must be token ids (decimal integers), not '{k}'",
                                          {"k": k})
            if not -100.0 <= b <= 100.0:
                raise PydanticCustomError("invalid_value", "biases must be within -100..100 (token {k}: {b})",
                                          {"k": k, "b": b})
        return v
    ignore_eos: bool = False     # vLLM's and llama-server's extension: generate to the limit (benchmarks)

    @model_validator(mode="after")
    def _check_stop(self) -> "_Sampling":
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"'stop' takes at most {MAX_STOP} strings")
        if any(not s for s in stops):
            raise ValueError("'stop' strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_value", "'stream_options' is only allowed when 'stream' is true",
                                      {"field": "stream_options"})
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias`` as (token, bias) pairs; -100 bans the token outright
        (-inf), +100 makes it the only choice (as OpenAI documents), other values add."""
        out = []
        for k, b in (self.logit_bias or {}).items():
            out.append((int(k), float("-inf") if b <= -100.0 else float(b)))
        return tuple(out)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    tools: Optional[list[Tool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI fields kv3d cannot honour
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, v: Any) -> Any:
        return _unsupported("modalities", v, ["text"])

    @field_validator("audio", "prediction", "reasoning_effort", "web_search_options", "functions", "function_call",
                     "verbosity", "prompt_cache_key", "safety_identifier", mode="before")
    @classmethod
    def _not_honoured(cls, v: Any, info: ValidationInfo) -> Any:
        return _unsupported(info.field_name, v)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is None or v in ("none", "auto", "required") and isinstance(v, str):
            return v
        if (isinstance(v, dict) and set(v) == {"type", "function"} and v["type"] == "function"
                and isinstance(v["function"], dict) and set(v["function"]) == {"name"}
                and isinstance(v["function"]["name"], str)):
            return v
        raise PydanticCustomError("invalid_value", "must be 'none', 'auto', 'required' or a named function: "
                                  '{"type": "function", "function": {"name": ...}}')

    @model_validator(mode="after")
    def _check_tools(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise PydanticCustomError("invalid_value", "two tools share one name", {"field": "tools"})
        if not self.tools:
            for field in ("tool_choice", "parallel_tool_calls"):
                if getattr(self, field) is not None and not (field == "tool_choice" and self.tool_choice == "none"):
                    raise PydanticCustomError("invalid_value",
                                              "'{field}' is only allowed when 'tools' are given", {"field": field})
        if isinstance(self.tool_choice, dict) and self.tool_choice["function"]["name"] not in names:
            raise PydanticCustomError("invalid_value", "'tool_choice' names the function '{n}', which is not "
                                      "among the tools", {"n": self.tool_choice["function"]["name"], "field": "tool_choice"})
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("invalid_value", "'top_logprobs' needs 'logprobs': true",
                                      {"field": "top_logprobs"})
        return self

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_mode(self) -> str | None:
        """None (no tools), 'none', 'auto', 'required', or the named function's name."""
        if not self.tools:
            return None
        c = self.tool_choice
        if c is None:
            return "auto"
        return c if isinstance(c, str) else "function:" + c["function"]["name"]

    @property
    def tools_forced(self) -> bool:
        """The reply must be tool calls: ``tool_choice`` "required" or a named function."""
        mode = self.tool_mode
        return mode == "required" or (mode or "").startswith("function:")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Any = None
    best_of: Any = None

    @field_validator("suffix", mode="before")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        return _unsupported("suffix", v)

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise PydanticCustomError("invalid_value", "'best_of' must be at least 1")
        return _unsupported("best_of (above 1)", v, 1)

    @model_validator(mode="after")
    def _check_prompt(self) -> "CompletionRequest":
        p = self.prompt
        problem = None
        if isinstance(p, list):
            if not p:
                problem = "'prompt' must not be empty"
            elif isinstance(p[0], (str, list)):
                if len(p) > MAX_PROMPTS:
                    problem = f"at most {MAX_PROMPTS} prompts per request"
                elif any(not x for x in p):
                    problem = "'prompt' must not hold an empty prompt"
        elif p == "":
            problem = "'prompt' must not be empty"
        if problem is None and len(self.prompts) * self.n > MAX_CHOICES:
            problem = f"prompts x n must be at most {MAX_CHOICES}"
        if problem:
            raise PydanticCustomError("invalid_value", problem, {"field": "prompt"})
        return self

    @property
    def limit(self) -> Optional[int]:
        return self.max_tokens

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """Every prompt of the request: a string or a list of token ids each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]                            # type: ignore[list-item]
        return list(p)                            # type: ignore[arg-type]
