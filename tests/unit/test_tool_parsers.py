import json

import pytest

from semipd.runtime.tools import ToolReply, make_parser

pytestmark = pytest.mark.unit
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def calls(found):
    return [(c.name, json.loads(c.arguments)) for c in found]


def test_each_family_parser_reads_its_models_call_format():
    hermes = make_parser("hermes")
    content, found = hermes.extract('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                    '"Paris"}}\n</tool_call>\n<tool_call>{"name": "t", "arguments": {}}</tool_call>')
    assert content == "Let me look." and calls(found) == [("get_weather", {"city": "Paris"}), ("t", {})]
    llama = make_parser("llama3_json")
    content, found = llama.extract('<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b"}}; '
                                   '{"name": "t", "parameters": {}}')
    assert content is None and calls(found) == [("get_weather", {"city": "a;b"}), ("t", {})]
    mistral = make_parser("mistral")
    content, found = mistral.extract('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert content is None and calls(found) == [("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("parser,text", [("hermes", "just words"), ("hermes", "<tool_call>{not json</tool_call>"),
                                         ("llama3_json", '{"no": "name"}'), ("mistral", "[TOOL_CALLS] nope")])
def test_a_reply_that_is_not_a_well_formed_call_stays_content(parser, text):
    assert make_parser(parser).extract(text) == (text, [])


def feed_all(reply, pieces):
    deltas = [d for p in pieces for d in reply.feed(p)]
    last, called = reply.finish()
    return deltas + last, called


def test_auto_streams_content_until_the_call_then_the_call_whole():
    reply = ToolReply([WEATHER], "auto", make_parser("hermes"))
    deltas, called = feed_all(reply, ["Sure", ", one ", "moment <to", "ol_call>{\"name\": \"get_weather\", ",
                                      "\"arguments\": {\"city\": \"Oslo\"}}</tool_call>"])
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure, one moment" or content == "Sure, one moment "
    assert "<to" not in content, "the start of the marker must not leak as content"
    [call] = [c for d in deltas for c in d.get("tool_calls", [])]
    assert called and call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"} and call["id"].startswith("call_")


def test_auto_without_a_call_streams_everything_as_content():
    reply = ToolReply([WEATHER], "auto", make_parser("hermes"))
    deltas, called = feed_all(reply, ["no tools ", "needed <", "3"])
    assert not called and "".join(d["content"] for d in deltas) == "no tools needed <3"


def test_a_named_function_streams_its_arguments_as_they_come():
    reply = ToolReply([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, make_parser("hermes"))
    deltas, called = feed_all(reply, ['{"city"', ': "Lima"}'])
    assert called
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather" and "id" in deltas[0]["tool_calls"][0]
    args = "".join(c["function"]["arguments"] for d in deltas for c in d["tool_calls"])
    assert json.loads(args) == {"city": "Lima"}
    assert {c["index"] for d in deltas for c in d["tool_calls"]} == {0}


def test_required_sends_nothing_until_the_calls_are_complete():
    reply = ToolReply([WEATHER], "required", make_parser("hermes"))
    assert reply.feed('[{"name": "get_weather", ') == []
    deltas, called = feed_all(reply, ['"arguments": {"city": "Kyiv"}}]'])
    assert called and [c["function"]["name"] for d in deltas for c in d["tool_calls"]] == ["get_weather"]


def test_required_is_a_list_of_the_tools_and_one_call_without_parallel_calls():
    from semipd.runtime.tools import forced_call_grammar
    spec = forced_call_grammar([WEATHER], "required", parallel=True)
    schema = json.loads(spec.value)
    assert spec.kind == "json" and schema["minItems"] == 1 and "maxItems" not in schema
    [option] = schema["items"]["anyOf"]
    assert option["properties"]["name"] == {"const": "get_weather"}
    assert option["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert json.loads(forced_call_grammar([WEATHER], "required", parallel=False).value)["maxItems"] == 1
    named = forced_call_grammar([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.value) == WEATHER["function"]["parameters"]
