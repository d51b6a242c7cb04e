"""Bad requests get a 4xx with the OpenAI error body naming the field, never a 500, and never disturb requests
already running: long greedy streams run the whole time and must come out complete and identical to a quiet run.
A full queue answers 503 with Retry-After."""
import asyncio
import json
import threading

import httpx
import pytest

pytestmark = pytest.mark.engine

LOAD_STREAMS = 3
LOAD_BODY = dict(prompt="The load that must not notice", max_tokens=300, temperature=0, ignore_eos=True)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

# (endpoint, JSON body, or raw bytes, expected status, expected param)
CASES = {
    "invalid json": (COMPLETIONS, b'{"prompt": "x", ', 400, None),
    "nan is not json": (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 400, None),
    "body not an object": (COMPLETIONS, [1, 2], 400, None),
    "missing prompt": (COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    "prompt wrong type": (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    "prompt empty list": (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    "too many prompts": (COMPLETIONS, {"prompt": ["a"] * 65}, 400, "prompt"),
    "a prompt in the list empty": (COMPLETIONS, {"prompt": ["a", []]}, 400, "prompt"),
    "negative token id": (COMPLETIONS, {"prompt": [1, -4]}, 400, "prompt"),
    "token id outside vocab": (COMPLETIONS, {"prompt": [1, 10**6]}, 400, "prompt"),
    "prompt over max_model_len": (COMPLETIONS, {"prompt": [7] * 2100}, 400, "prompt"),
    "prompt leaves no room": (COMPLETIONS, {"prompt": [7] * 2048}, 400, "prompt"),
    "max_tokens string": (COMPLETIONS, {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    "max_tokens negative": (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    "max_tokens zero": (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens float": (COMPLETIONS, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    "max_tokens huge": (COMPLETIONS, {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    "max_tokens past context": (COMPLETIONS, {"prompt": [7] * 2040, "max_tokens": 20}, 400, "max_tokens"),
    "temperature negative": (COMPLETIONS, {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    "temperature too high": (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    "temperature string": (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    "top_p negative": (COMPLETIONS, {"prompt": "x", "top_p": -0.1}, 400, "top_p"),
    "top_p above one": (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    "top_k below -1": (COMPLETIONS, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    "seed string": (COMPLETIONS, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    "seed too large": (COMPLETIONS, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    "n zero": (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    "n too many": (COMPLETIONS, {"prompt": "x", "n": 17}, 400, "n"),
    "stream not bool": (COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    "stop wrong type": (COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop"),
    "stop empty string": (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    "stop_token_ids negative": (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    "stop_token_ids outside vocab": (COMPLETIONS, {"prompt": "x", "stop_token_ids": [10**6]}, 400,
                                     "stop_token_ids"),
    "ignore_eos not bool": (COMPLETIONS, {"prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
    "stream_options without stream": (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}},
                                      400, "stream_options"),
    "logprobs too many": (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    "logprobs bool on completions": (COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    "echo with logprobs": (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    "presence_penalty too high": (COMPLETIONS, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    "frequency_penalty string": (COMPLETIONS, {"prompt": "x", "frequency_penalty": "lots"}, 400,
                                 "frequency_penalty"),
    "repetition_penalty zero": (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    "logit_bias key not a token": (COMPLETIONS, {"prompt": "x", "logit_bias": {"the": 5}}, 400, "logit_bias"),
    "logit_bias out of range": (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    "logit_bias outside vocab": (COMPLETIONS, {"prompt": "x", "logit_bias": {"1000000": 1}}, 400, "logit_bias"),
    "chat top_logprobs without logprobs": (CHAT, {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    "chat top_logprobs too many": (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400,
                                   "top_logprobs"),
    "unknown model": (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    "chat missing messages": (CHAT, {"max_tokens": 3}, 400, "messages"),
    "chat empty messages": (CHAT, {"messages": []}, 400, "messages"),
    "chat bad role": (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    "chat image content": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
                           "messages[0].content"),
    "chat messages too long": (CHAT, {"messages": [{"role": "user", "content": "word " * 5000}]}, 400,
                               "messages"),
    "chat max_completion_tokens huge": (CHAT, {"messages": MSG, "max_completion_tokens": 10**9}, 400,
                                       "max_completion_tokens"),
    "chat top_p string": (CHAT, {"messages": MSG, "top_p": "high"}, 400, "top_p"),
    "chat unknown model": (CHAT, {"messages": MSG, "model": "nope"}, 404, "model"),
    "chat tool without a function": (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400,
                                     "tools[0].function"),
    "chat tool_choice names no tool": (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {
        "name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}, 400, "tool_choice"),
    "chat tool_choice required without tools": (CHAT, {"messages": MSG, "tool_choice": "required"}, 400,
                                                "tool_choice"),
    "stream_options include_usage not bool": (COMPLETIONS, {"prompt": "x", "stream": True,
                                                            "stream_options": {"include_usage": 1}}, 400,
                                              "stream_options.include_usage"),
    # JSON allows a lone surrogate escape; no tokenizer can encode it
    "prompt lone surrogate": (COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    "chat lone surrogate": (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
                            "messages[0].content"),
    "model lone surrogate": (COMPLETIONS, b'{"prompt": "x", "model": "\\ud800"}', 400, "model"),
    "stop lone surrogate": (COMPLETIONS, b'{"prompt": "x", "stop": ["ok", "\\udc00"]}', 400, "stop[1]"),
    "nested too deeply": (COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
}
SURROGATE_CASES = [case for case in CASES if "surrogate" in case]


class Load:
    """Long greedy streams, restarted until told to stop, each checked against the quiet-run text."""

    def __init__(self, url: str, expected_text: str):
        self.url, self.expected = url, expected_text
        self.stop = threading.Event()
        self.results: list[tuple[str, str | None, int | None]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOAD_STREAMS)]
        self.first_chunk = threading.Barrier(LOAD_STREAMS + 1)

    def _run(self):
        first = True
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    self.results.append(self._one(client, first))
                except Exception as exc:         # noqa: BLE001 - reported by the final test
                    self.errors.append(repr(exc))
                    if first:
                        self.first_chunk.abort()
                first = False

    def _one(self, client, signal_first: bool):
        body = LOAD_BODY | {"stream": True, "stream_options": {"include_usage": True}}
        text, finish, completion_tokens = [], None, None
        with client.stream("POST", self.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event["choices"]:
                    text.append(event["choices"][0]["text"])
                    finish = event["choices"][0]["finish_reason"] or finish
                    if signal_first:
                        signal_first = False
                        self.first_chunk.wait(60)
                else:
                    completion_tokens = event["usage"]["completion_tokens"]
        return "".join(text), finish, completion_tokens

    def start(self):
        for t in self.threads:
            t.start()
        self.first_chunk.wait(120)      # every stream is running before the bad requests start

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(180)


@pytest.fixture(scope="module")
def load(default_server):
    quiet = httpx.post(default_server.url + "/v1/completions", json=LOAD_BODY, timeout=120).json()
    load = Load(default_server.url, quiet["choices"][0]["text"])
    load.start()
    yield load
    load.finish()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_a_clear_4xx(default_server, load, case):
    path, body, status, param = CASES[case]
    if isinstance(body, bytes):
        r = httpx.post(default_server.url + path, content=body, headers={"content-type": "application/json"},
                       timeout=60)
    else:
        r = httpx.post(default_server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param
    assert error["message"]
    if param:
        assert param in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    assert not load.stop.is_set() and all(t.is_alive() for t in load.threads)


@pytest.mark.parametrize("case", SURROGATE_CASES)
def test_lone_surrogate_is_named_without_tokenizer_internals(default_server, load, case):
    path, body, _, param = CASES[case]
    r = httpx.post(default_server.url + path, content=body, headers={"content-type": "application/json"},
                   timeout=60)
    message = r.json()["error"]["message"]
    assert message.startswith(f"{param}: ") and "lone UTF-16 surrogate" in message, message
    for internal in ("TextEncodeInput", "codec", "Union[", "PyString", "Traceback"):
        assert internal not in message


def test_unknown_route_and_method_use_the_error_body(default_server, load):
    r = httpx.get(default_server.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(default_server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_load_survived_the_bad_requests(default_server, load):
    load.finish()
    assert not load.errors, load.errors
    assert len(load.results) >= LOAD_STREAMS
    for text, finish, completion_tokens in load.results:
        assert finish == "length"
        assert completion_tokens == LOAD_BODY["max_tokens"]
        assert text == load.expected
    assert "Traceback" not in default_server.log()
    assert " 500 " not in default_server.log()


def test_full_queue_answers_503_with_retry_after(start_server):
    server = start_server("--max-num-waiting", "1", "--max-num-batched-tokens", "16")

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": [11] * 200, "max_tokens": 2}
            return await asyncio.gather(*[client.post(server.url + "/v1/completions", json=body)
                                          for _ in range(24)])

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "overloaded" and "queue" in error["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    # the server is still fine afterwards
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
