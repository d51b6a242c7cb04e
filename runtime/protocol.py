"""OpenAI request models, their validation, and the response/chunk bodies the server sends.

Validation is strict on purpose: a wrongly typed field ("max_tokens": "5", "stream": 1) is a 400 naming the
field, never silently coerced. Unknown fields are ignored (OpenAI SDKs and benchmark clients send extras);
known features this engine does not implement (logprobs, penalties, tools, echo, n > 1) are refused clearly
when asked for, and accepted at their neutral values.
"""
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semipd.runtime.sampling import SamplingParams

# OpenAI's own default for /v1/completions; chat defaults to whatever still fits (see resolve_max_tokens).
COMPLETION_DEFAULT_MAX_TOKENS = 16
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# Accepted only at these values: anything else would change what a client expects back.
NEUTRAL_VALUES: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error the client caused or must handle; rendered as the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code, **self.extra)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = False          # null (which OpenAI's schema allows) means false


# Fields OpenAI's schema (or vLLM's) lets a client send as null, meaning "the default".
NULL_MEANS_DEFAULT = ("stream", "n", "ignore_eos", "return_token_ids")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_nulls_and_unused_tools(cls, data):
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}
        # tool_choice "none" means no tool may be called, so the tools are ignored: clients that always send
        # their tools must still work. Any other tool use is refused (tools are not implemented).
        if data.get("tool_choice") == "none":
            data.pop("tools", None)
        return data

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: Any = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None                     # accepted and ignored
    return_token_ids: bool = False              # vLLM extension: token ids beside the text (each chunk's own, streamed)

    # Unimplemented features, accepted only at NEUTRAL_VALUES.
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v or []

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported; send several requests for several choices")
        return v

    @model_validator(mode="after")
    def _neutral_and_stream(self):
        for name, allowed in NEUTRAL_VALUES.items():
            value = getattr(self, name)
            # `value in allowed` would take True for 1 and 1 for True; compare type-aware.
            if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
                raise ValueError(f"{name}: {json.dumps(value)[:60]} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The asked-for length and the field it came from (max_completion_tokens wins, as in OpenAI's chat)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=-1 if self.top_k in (None, 0) else self.top_k,
                seed=self.seed,
                max_tokens=max_tokens,
                stop=list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
            )
        except ValueError as e:
            raise bad_request(str(e)) from None


class CompletionRequest(_Common):
    # str, [token ids], or a one-element list of either; several prompts are refused (n=1 per request).
    prompt: Any = Field(...)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if any(t < 0 for t in v):
                raise ValueError("token ids must be >= 0")
            return v
        if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("several prompts in one request are not supported; send one request per prompt")
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        raise ValueError("must be a string or a list of token ids")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        # Text parts are joined; anything else (images, audio) this text-only server cannot use.
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)


def parse_request(raw: bytes, model: type[_Common]) -> _Common:
    """Body bytes -> request model, or a 400 APIError whose message and param name the offending field."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        data = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:      # RecursionError: nested too deeply
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    _refuse_lone_surrogates(data, ())
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = _param_name(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if param is None and ":" in msg:        # model-level checks name their field themselves
        param = msg.split(":", 1)[0]
        return bad_request(msg, param)
    if err["type"] == "missing":
        msg = "field required"
    return bad_request(f"{param}: {msg}" if param else msg, param)


def _refuse_lone_surrogates(value, loc: tuple) -> None:
    """JSON may escape half of a UTF-16 surrogate pair ("\\ud800") alone; that is no Unicode text, so no
    tokenizer can encode it and no response can echo it. Refused here, naming the field, before anything tries."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")       # fails on surrogates only, and at C speed on megabyte prompts
        except UnicodeEncodeError as e:
            param = _param_name(loc)
            raise bad_request(f"{param or 'body'}: character {e.start} is a lone UTF-16 surrogate "
                              f"(\\u{ord(value[e.start]):04x}), which is not valid Unicode text", param) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, loc)
            _refuse_lone_surrogates(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, (*loc, index))


def _param_name(loc: tuple) -> str | None:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def resolve_max_tokens(requested: tuple[int | None, str], prompt_len: int, max_model_len: int,
                       default_cap: int | None, prompt_param: str) -> int:
    """How many tokens to generate. Without an explicit value: min(default_cap, what fits) (completions use
    OpenAI's 16), or everything that fits (chat, default_cap None). An explicit value that does not fit is an
    error, as in vLLM, rather than silently shortened."""
    requested, field = requested
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"{prompt_param}: the prompt is {prompt_len} tokens, but this model's maximum context length is "
            f"{max_model_len} tokens, which leaves no room for a completion", prompt_param, "context_length_exceeded")
    if requested is None:
        return room if default_cap is None else min(default_cap, room)
    if requested > room:
        raise bad_request(
            f"{field}: this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} tokens and {field} asks for {requested}, {prompt_len + requested} in all",
            field, "context_length_exceeded")
    return requested


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class ResponseShape:
    """Bodies for one request: the same id/created/model on every chunk."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, return_token_ids: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.return_token_ids = return_token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self._role_sent = False

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None, token_ids: list[int] = ()) -> dict:
        if self.chat:
            delta = {} if self._role_sent else {"role": "assistant"}
            if text or not self._role_sent:
                delta["content"] = text
            self._role_sent = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion") | {"choices": [choice]}
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        if self.include_usage:
            body["usage"] = None            # OpenAI: every chunk but the last carries "usage": null
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def full(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0, token_ids: list[int] | None = None,
             prompt_token_ids: list[int] | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        if token_ids is not None:
            choice |= {"token_ids": token_ids, "prompt_token_ids": prompt_token_ids}
        return self._head(obj) | {"choices": [choice],
                                  "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
