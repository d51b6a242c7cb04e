"""Tool calling through the real server and the official openai client. A named function and "required" are
forced by structured output, so even the tiny random model's calls parse and their arguments validate; "auto"
is read by the model family's parser, shown here by steering the tiny model with guided_regex into the exact
text a Qwen (hermes) or Llama (llama3_json) model writes for a call; streamed calls assemble into the same."""
import json

import openai
import pytest

pytestmark = pytest.mark.engine

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "what is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_server(start_server_module, tiny_qwen3_dir):
    return start_server_module("--model", str(tiny_qwen3_dir), "--max-model-len", "1024")


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_weather(arguments: str):
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo", "Lima") and 1 <= args["days"] <= 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_named_function_is_always_called_with_valid_arguments(default_server, seed):
    out = client(default_server).chat.completions.create(
        model="tiny-llama", messages=MSGS, tools=[WEATHER, TIME], max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_weather(call.function.arguments)


def test_required_calls_one_of_the_tools(default_server):
    for seed in range(3):
        out = client(default_server).chat.completions.create(
            model="tiny-llama", messages=MSGS, tools=[WEATHER, TIME], tool_choice="required", max_tokens=150,
            temperature=1.0, seed=seed, parallel_tool_calls=False)
        # (with parallel calls the random model keeps adding calls until max_tokens: one is what it can finish)
        calls = out.choices[0].message.tool_calls
        assert calls and len(calls) == 1 and out.choices[0].finish_reason == "tool_calls"
        for call in calls:
            assert call.function.name in ("get_weather", "get_time")
            if call.function.name == "get_weather":
                check_weather(call.function.arguments)


def test_none_hides_the_tools_and_answers_in_text(default_server):
    out = client(default_server).chat.completions.create(model="tiny-llama", messages=MSGS, tools=[WEATHER],
                                                          tool_choice="none", max_tokens=5, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"


def test_streamed_named_call_assembles_into_the_same_call(default_server):
    stream = client(default_server).chat.completions.create(
        model="tiny-llama", messages=MSGS, tools=[WEATHER], stream=True, temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, args, finish, ids = None, "", None, set()
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                ids.add(call.id) if call.id else None
                name = call.function.name or name
                args += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather" and len(ids) == 1 and finish == "tool_calls"
    check_weather(args)


HERMES_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "days": [1-7]\}\}' \
              r'\n</tool_call>'


def test_auto_reads_a_qwen_models_hermes_call(qwen_server):
    c = client(qwen_server)
    out = c.chat.completions.create(model="tiny-qwen3", messages=MSGS, tools=[WEATHER], max_tokens=80,
                                    temperature=0, extra_body={"guided_regex": HERMES_CALL})
    [call] = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    check_weather(call.function.arguments)
    stream = c.chat.completions.create(model="tiny-qwen3", messages=MSGS, tools=[WEATHER], max_tokens=80,
                                       temperature=0, stream=True, extra_body={"guided_regex": HERMES_CALL})
    deltas = [d for chunk in stream for ch in chunk.choices for d in (ch.delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(call.function.name, json.loads(call.function.arguments))]


def test_auto_reads_a_llama_models_json_call_and_a_conversation_with_tool_results_renders(default_server):
    c = client(default_server)
    regex = r'\{"name": "get_weather", "parameters": \{"city": "Lima", "days": 3\}\}'
    out = c.chat.completions.create(model="tiny-llama", messages=MSGS, tools=[WEATHER], max_tokens=80,
                                    temperature=0, extra_body={"guided_regex": regex})
    [call] = out.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Lima", "days": 3}
    follow_up = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'}]
    again = c.chat.completions.create(model="tiny-llama", messages=follow_up, tools=[WEATHER], max_tokens=4,
                                      temperature=0, tool_choice="none")
    assert again.choices[0].finish_reason == "length"
