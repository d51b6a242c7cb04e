"""Values OpenAI's schema allows are accepted and mean what they mean there: null for the default, top_p 0 (only
the most likely token), tools a client always sends next to tool_choice "none"; and the chat message carries
the `refusal` the response schema requires."""
import httpx
import openai
import pytest

pytestmark = pytest.mark.engine

GREEDY = dict(temperature=0, ignore_eos=True, max_tokens=12)
MSG = [{"role": "user", "content": "Name a colour."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def post(server, path: str, **body) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_nulls_mean_the_default(default_server, read_sse):
    plain = post(default_server, "/v1/completions", prompt="null means default", **GREEDY)
    nulls = post(default_server, "/v1/completions", prompt="null means default", stream=None, n=None,
                 return_token_ids=None, stream_options=None, top_p=None, stop=None, seed=None, **GREEDY)
    assert "token_ids" not in nulls["choices"][0]           # return_token_ids: null is false
    assert nulls["choices"][0]["text"] == plain["choices"][0]["text"]
    assert nulls["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    chat = post(default_server, "/v1/chat/completions", messages=MSG, stream=None, n=None, **GREEDY)
    assert chat["object"] == "chat.completion"

    body = dict(prompt="null means default", stream=True, stream_options={"include_usage": None}, **GREEDY)
    with httpx.stream("POST", default_server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["choices"] and "usage" not in e for e in chunks)     # include_usage: null is false
    assert "".join(e["choices"][0]["text"] for e in chunks) == plain["choices"][0]["text"]


def test_top_p_zero_samples_only_the_most_likely_token(default_server):
    greedy = post(default_server, "/v1/completions", prompt="top p zero", **GREEDY)["choices"][0]["text"]
    for seed in (1, 2, 3):
        body = GREEDY | {"temperature": 1.5, "top_p": 0, "seed": seed}
        assert post(default_server, "/v1/completions", prompt="top p zero", **body)["choices"][0]["text"] == greedy
    sampled = {post(default_server, "/v1/completions", prompt="top p zero",
                    **GREEDY | {"temperature": 1.5, "seed": seed})["choices"][0]["text"] for seed in (1, 2, 3)}
    assert sampled != {greedy}            # without top_p 0 these seeds do sample something else


def test_chat_message_has_refusal_null(default_server):
    message = post(default_server, "/v1/chat/completions", messages=MSG, **GREEDY)["choices"][0]["message"]
    assert set(message) == {"role", "content", "refusal"} and message["refusal"] is None


def test_tools_with_tool_choice_none_are_ignored(default_server, tiny_llama_dir):
    without = post(default_server, "/v1/chat/completions", messages=MSG, **GREEDY)
    with_tools = post(default_server, "/v1/chat/completions", messages=MSG, tools=TOOLS, tool_choice="none",
                      **GREEDY)
    assert with_tools["choices"][0]["message"]["content"] == without["choices"][0]["message"]["content"]
    assert with_tools["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        out = client.chat.completions.create(model=tiny_llama_dir.name, messages=MSG, tools=TOOLS,
                                             tool_choice="none", max_tokens=4, temperature=0)
    assert out.choices[0].message.content and out.choices[0].message.refusal is None
