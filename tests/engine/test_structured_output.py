"""Structured output through the real server: even the tiny random model, whose unconstrained text is noise,
returns JSON that validates against the requested schema (strict), any JSON for json_object, text matching a
regex, one of the given choices, whatever the sampling seed; the grammar holds in streaming too. A schema that
cannot be compiled is a 400 naming the field, and other requests are unaffected."""
import json
import re

import httpx
import pytest

pytestmark = pytest.mark.engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["river", "stone", "garden"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MSGS = [{"role": "user", "content": "describe a person as JSON"}]


def chat(server, **body):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 200} | body,
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def validate(doc: dict) -> None:
    assert set(doc) == {"name", "age", "tags"}
    assert doc["name"] in SCHEMA["properties"]["name"]["enum"]
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 120
    assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and all(isinstance(t, bool) for t in doc["tags"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_output_validates_against_the_schema(default_server, seed):
    choice = chat(default_server, temperature=1.0, seed=seed,
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                                          "strict": True}})
    assert choice["finish_reason"] == "stop"
    validate(json.loads(choice["message"]["content"]))


def test_vllms_guided_extras_and_json_object(default_server):
    validate(json.loads(chat(default_server, temperature=0, guided_json=SCHEMA)["message"]["content"]))
    any_json = chat(default_server, temperature=0.7, seed=5, max_tokens=300,
                    response_format={"type": "json_object"})
    if any_json["finish_reason"] == "stop":          # a long object may be cut by max_tokens; a whole one parses
        json.loads(any_json["message"]["content"])
    text = chat(default_server, temperature=1.0, seed=3, guided_regex=r"[a-c]{3}-[0-9]{2}")["message"]["content"]
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", text), text
    choices = ["north letter", "quiet bread", "music"]
    for seed in range(3):
        got = chat(default_server, temperature=1.0, seed=seed, guided_choice=choices)["message"]["content"]
        assert got in choices


def test_the_grammar_holds_when_streamed(default_server, read_sse):
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", timeout=120,
                      json={"messages": MSGS, "max_tokens": 200, "temperature": 1.0, "seed": 9, "stream": True,
                            "guided_json": SCHEMA}) as r:
        events = [e for e in read_sse(r) if isinstance(e, dict)]
    validate(json.loads("".join(c["delta"].get("content", "") for e in events for c in e["choices"])))


@pytest.mark.parametrize("body,param", [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_a_grammar_that_cannot_work_is_a_400_naming_the_field(default_server, body, param):
    r = httpx.post(default_server.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5} | body,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert chat(default_server, temperature=0, max_tokens=3)["finish_reason"] == "length"
