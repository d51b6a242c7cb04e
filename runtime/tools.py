"""Tool calling on chat: the model sees the tools through its chat template, and what it writes is read back as
OpenAI tool calls by the parser of its family (vLLM's names):

    llama3_json   Llama 3.x: the reply is a JSON object {"name": ..., "parameters": {...}} (after an optional
                  <|python_tag|>), several separated by ';'
    hermes        Qwen 2.5/3, Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one or more
    mistral       Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

tool_choice "required" and a named function constrain the reply with structured output, so a call always
parses: a named function's reply is its arguments object (the schema of its parameters); "required" is a JSON
array of {"name", "arguments"} objects, one of the tools each. "auto" lets the model choose; "none" hides the
tools from the template.
"""
import json
import re
import uuid
from dataclasses import dataclass

from semipd.runtime.guided import GuidedSpec

PARSERS = ("llama3_json", "hermes", "mistral")
BY_ARCHITECTURE = {"LlamaForCausalLM": "llama3_json", "Qwen2ForCausalLM": "hermes", "Qwen3ForCausalLM": "hermes",
                   "MistralForCausalLM": "mistral"}


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str                 # a JSON object, as text (OpenAI sends it so)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def body(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(obj, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Reads tool calls out of a finished reply; `starts_call` tells a stream when to stop sending content."""
    name = ""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def starts_call(self, text: str) -> int | None:
        """Where in the reply so far a tool call begins (None: not yet, maybe never)."""
        raise NotImplementedError


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def extract(self, text):
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in _split_objects(body, ";"):
            call = _call(_loads(part), "parameters")
            if call is None:
                return text, []
            calls.append(call)
        return None, calls

    def starts_call(self, text):
        stripped = text.lstrip()
        if stripped.startswith(self.TAG) or stripped.startswith("{"):
            return len(text) - len(stripped)
        return None


class HermesParser(ToolParser):
    name = "hermes"
    PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def extract(self, text):
        at = text.find("<tool_call>")
        if at == -1:
            return text, []
        calls = [_call(_loads(m.group(1)), "arguments") for m in self.PATTERN.finditer(text, at)]
        if not calls or None in calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls

    def starts_call(self, text):
        at = text.find("<tool_call>")
        return None if at == -1 else at


class MistralParser(ToolParser):
    name = "mistral"
    MARK = "[TOOL_CALLS]"

    def extract(self, text):
        at = text.find(self.MARK)
        if at == -1:
            return text, []
        parsed = _loads(text[at + len(self.MARK):].strip())
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_call(item, "arguments") for item in items]
        if not calls or None in calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls

    def starts_call(self, text):
        at = text.find(self.MARK)
        return None if at == -1 else at


def make_parser(name: str) -> ToolParser:
    return {"llama3_json": Llama3JsonParser, "hermes": HermesParser, "mistral": MistralParser}[name]()


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _split_objects(text: str, separator: str) -> list[str]:
    """Top-level JSON values separated by `separator` (never inside a string or a nested value)."""
    parts, depth, in_string, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


# ---- forced calls: structured output ------------------------------------------------------------------------
def forced_call_grammar(tools: list[dict], tool_choice, parallel: bool = True) -> GuidedSpec | None:
    """The grammar that makes the reply a call: for a named function its arguments, for "required" a list (of
    one call when parallel calls are off)."""
    if isinstance(tool_choice, dict):
        fn = _function(tools, tool_choice["function"]["name"])
        return GuidedSpec("json", json.dumps(fn.get("parameters") or {"type": "object"}))
    if tool_choice == "required":
        options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                     "arguments": t["function"].get("parameters")
                                                     or {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if not parallel:
            schema["maxItems"] = 1
        return GuidedSpec("json", json.dumps(schema))
    return None


def forced_calls(tools: list[dict], tool_choice, text: str) -> list[ToolCall]:
    """The calls a reply made under forced_call_grammar (the grammar guarantees it parses, unless cut short)."""
    parsed = _loads(text)
    if isinstance(tool_choice, dict):
        return [ToolCall(tool_choice["function"]["name"], json.dumps(parsed, ensure_ascii=False))] \
            if isinstance(parsed, dict) else []
    if not isinstance(parsed, list):
        return []
    calls = [_call(item, "arguments") for item in parsed]
    return [c for c in calls if c is not None]


def _function(tools: list[dict], name: str) -> dict:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool["function"]
    raise KeyError(name)


# ---- one choice's reply ---------------------------------------------------------------------------------------
class ToolReply:
    """Turns one choice's text into content and tool calls, whole or as OpenAI stream deltas. Content is streamed
    until a call starts (auto) or not at all (forced); calls are sent when the reply is complete, each as one
    delta with its id, name and arguments (a named function streams its arguments as they come)."""

    def __init__(self, tools: list[dict], tool_choice, parser: ToolParser):
        self.tools, self.tool_choice, self.parser = tools, tool_choice, parser
        self.text = ""
        self.sent = 0                     # characters of content already streamed
        self.in_call = tool_choice == "required"
        self.named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        self.named_id = ToolCall(self.named or "-", "{}").id

    def whole(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.tool_choice == "auto":
            return self.parser.extract(text)
        return None, forced_calls(self.tools, self.tool_choice, text)

    def feed(self, text: str) -> list[dict]:
        """Deltas for newly generated text."""
        self.text += text
        if self.named is not None:
            first = not self.sent
            self.sent = len(self.text)
            call = {"index": 0, "function": {"arguments": text}}
            if first:
                call |= {"id": self.named_id, "type": "function", "function": {"name": self.named, "arguments": text}}
            return [{"tool_calls": [call]}] if text or first else []
        if self.in_call:
            return []
        at = self.parser.starts_call(self.text)
        end = len(self.text) if at is None else at
        if at is not None:
            self.in_call = True
        # hold back what could be the start of a marker ("<tool", "[TOOL") until it is known not to be one
        end = min(end, self._safe_end()) if at is None else end
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return [{"content": delta}] if delta else []

    def _safe_end(self) -> int:
        for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
            for k in range(len(marker) - 1, 0, -1):
                if self.text.endswith(marker[:k]):
                    return len(self.text) - k
        if self.parser.name == "llama3_json" and not self.text.strip():
            return self.sent             # a reply that is only whitespace so far may still turn into a call
        return len(self.text)

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether the reply was a tool call."""
        if self.named is not None:
            return [], bool(forced_calls(self.tools, self.tool_choice, self.text))
        content, calls = self.whole(self.text)
        if not calls:
            rest = self.text[self.sent:]
            return ([{"content": rest}] if rest else []), False
        deltas = []
        if content and len(content) > self.sent:
            deltas.append({"content": content[self.sent:]})
        deltas.append({"tool_calls": [{"index": i} | c.body() for i, c in enumerate(calls)]})
        return deltas, True
