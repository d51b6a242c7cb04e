"""OpenAI request models, their validation, and the response/chunk bodies the server sends.

Validation is strict on purpose: a wrongly typed field ("max_tokens": "5", "stream": 1) is a 400 naming the
field, never silently coerced. Unknown fields are ignored (OpenAI SDKs and benchmark clients send extras);
known features this engine does not implement (tools, response_format, best_of, suffix) are refused clearly
when asked for, and accepted at their neutral values.
"""
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semipd.runtime.guided import GuidedSpec
from semipd.runtime.sampling import MAX_LOGPROBS, SamplingParams

# OpenAI's own default for /v1/completions; chat defaults to whatever still fits (see resolve_max_tokens).
COMPLETION_DEFAULT_MAX_TOKENS = 16
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_N = 16                     # choices per prompt
MAX_PROMPTS = 64               # prompts in one completions request

# Accepted only at these values: anything else would change what a client expects back.
NEUTRAL_VALUES: dict[str, tuple] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
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
    def _defaults_for_nulls(cls, data):
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not (v is None and k in NULL_MEANS_DEFAULT)}

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
    n: int = Field(1, ge=1, le=MAX_N)           # choices per prompt (seeded choices use seed, seed + 1, ...)
    user: str | None = None                     # accepted and ignored
    return_token_ids: bool = False              # vLLM extension: token ids beside the text (each chunk's own, streamed)

    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)   # vLLM extension
    logit_bias: dict[str, float] | None = None

    # Structured output: OpenAI's response_format, or one of vLLM's guided_* extras.
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # Unimplemented features, accepted only at NEUTRAL_VALUES.
    best_of: Any = None
    suffix: Any = None

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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if not v:
            return {}
        out = {}
        for key, bias in v.items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
            out[int(key)] = float(bias)
        return out

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

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs."""
        return None

    @model_validator(mode="after")
    def _one_structured_output(self):
        asked = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.get("type") != "text":
            asked.append("response_format")
        if len(asked) > 1:
            raise ValueError(f"{asked[1]}: only one kind of structured output per request (also got {asked[0]})")
        self.guided_spec                        # its own checks: a 400 now, not at compile time
        return self

    @property
    def guided_spec(self) -> "GuidedSpec | None":
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "text":
                return None
            if kind == "json_object":
                return GuidedSpec("json_object", "")
            if kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise ValueError("response_format: json_schema needs {\"json_schema\": {\"name\": ..., "
                                     "\"schema\": {...}}}")
                return GuidedSpec("json", json.dumps(schema))
            raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise ValueError("guided_json: a string must hold a JSON schema") from None
            return GuidedSpec("json", json.dumps(schema))
        if self.guided_regex is not None:
            return GuidedSpec("regex", self.guided_regex)
        if self.guided_choice is not None:
            if not self.guided_choice or any(not c for c in self.guided_choice):
                raise ValueError("guided_choice: must be a list of non-empty strings")
            return GuidedSpec("choice", json.dumps(self.guided_choice))
        if self.guided_grammar is not None:
            return GuidedSpec("grammar", self.guided_grammar)
        return None

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
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=dict(self.logit_bias or {}),
                logprobs=self.num_logprobs,
            )
        except ValueError as e:
            raise bad_request(str(e)) from None


class CompletionRequest(_Common):
    # str, [token ids], or a list of either (several prompts: choices are numbered prompt by prompt)
    prompt: Any = Field(...)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list:
        """Always a list of prompts, each a string or a list of token ids."""
        def one(p):
            if isinstance(p, str):
                return p
            if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if any(t < 0 for t in p):
                    raise ValueError("token ids must be >= 0")
                return p
            if isinstance(p, list) and not p:
                raise ValueError("must not be empty")
            raise ValueError("must be a string, a list of token ids, or a list of either")
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
            return [one(p) for p in v]
        return [one(v)]

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[dict] | None = None        # an assistant's earlier calls
    tool_call_id: str | None = None             # a tool message answers this call

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
        if self.tool_calls:
            # templates render arguments with `tojson`: give them the object, not OpenAI's JSON text
            out["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _template_call(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None     # false: "required" makes exactly one call

    @model_validator(mode="after")
    def _tool_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise ValueError('tool_choice: must be "none", "auto", "required" or '
                                 '{"type": "function", "function": {"name": ...}}')
            if name not in {t.function.name for t in self.tools or []}:
                raise ValueError(f"tool_choice: function {name!r} is not among the tools")
        elif choice == "required" and not self.tools:
            raise ValueError('tool_choice: "required" needs tools')
        if self.calls_tools and (self.response_format is not None or self.guided_spec is not None) \
                and self.effective_tool_choice != "auto":
            raise ValueError("tool_choice: a forced tool call cannot be combined with response_format or guided_*")
        return self

    @property
    def effective_tool_choice(self):
        """OpenAI's default: auto when tools are given, none without."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.effective_tool_choice != "none"

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
    """Bodies for one request: the same id/created/model on every chunk; choices are numbered prompt by prompt,
    n per prompt."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, return_token_ids: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.return_token_ids = return_token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self._role_sent: set[int] = set()

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str, finish_reason: str | None, token_ids: list[int] = (),
              logprobs: dict | None = None) -> dict:
        if self.chat:
            return self.chat_delta(index, {"content": text} if text or index not in self._role_sent else {},
                                   finish_reason, token_ids, logprobs)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk_body("text_completion", choice, token_ids)

    def chat_delta(self, index: int, delta: dict, finish_reason: str | None, token_ids: list[int] = (),
                   logprobs: dict | None = None) -> dict:
        """A chat chunk with this delta (content, or tool calls); the choice's first also says its role."""
        if index not in self._role_sent:
            delta = {"role": "assistant", "content": None if "tool_calls" in delta else ""} | delta
            self._role_sent.add(index)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk_body("chat.completion.chunk", choice, token_ids)

    def _chunk_body(self, obj: str, choice: dict, token_ids) -> dict:
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        body = self._head(obj) | {"choices": [choice]}
        if self.include_usage:
            body["usage"] = None            # OpenAI: every chunk but the last carries "usage": null
        return body

    def usage_chunk(self, usage_body: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage_body}

    def choice(self, index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
               token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None,
               tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice |= {"token_ids": token_ids, "prompt_token_ids": prompt_token_ids}
        return choice

    def full(self, choices: list[dict], usage_body: dict) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return self._head(obj) | {"choices": choices, "usage": usage_body}


LOGPROB_FLOOR = -9999.0        # what JSON gets instead of -inf (as vLLM sends)


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict:
    """OpenAI's chat logprobs object from (token text, logprob, [(alternative text, logprob)]) per token."""
    def item(text, logprob):
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}
    return {"content": [item(t, lp) | {"top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]], offset: int) -> dict:
    """The legacy completions logprobs object; text offsets count from `offset` (what came before)."""
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, logprob, top in entries:
        body["tokens"].append(text)
        body["token_logprobs"].append(_finite(logprob))
        body["top_logprobs"].append({a: _finite(b) for a, b in top})
        body["text_offset"].append(offset)
        offset += len(text)
    return body


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
