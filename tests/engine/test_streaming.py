"""SSE streaming as benchmark clients read it, and what a client that walks away leaves behind (nothing)."""
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.engine


def stream_completion(server, read_sse, **body) -> list:
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_sse(r)


def test_completion_stream_chunks_usage_done(default_server, read_sse):
    body = dict(prompt="Streaming test", max_tokens=30, temperature=0, ignore_eos=True)
    events = stream_completion(default_server, read_sse, **body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 30
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 30
    assert chunks, "no token chunks"
    ids = {c["id"] for c in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    # every chunk carries at least one token: text, except possibly the last one that only says why it ended
    assert len(chunks) <= 30
    for c in chunks:
        assert c["object"] == "text_completion"
        [choice] = c["choices"]
        assert choice["text"] or choice["finish_reason"]
        assert c["usage"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    # the stream says what the non-streaming call says
    full = httpx.post(default_server.url + "/v1/completions", json=body, timeout=120).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert full["usage"] == usage_chunk["usage"]


def test_stream_without_usage_option_has_no_usage_chunk(default_server, read_sse):
    events = stream_completion(default_server, read_sse, prompt="x", max_tokens=5, ignore_eos=True)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])


def test_chat_stream_with_openai_client(default_server, tiny_llama_dir):
    messages = [{"role": "user", "content": "Say something"}]
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        stream = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, max_completion_tokens=20,
                                                temperature=0, extra_body={"ignore_eos": True})
        chunks = list(stream)
        full = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages,
                                              max_completion_tokens=20, temperature=0,
                                              extra_body={"ignore_eos": True})
    *token_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in token_chunks[1:])
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.choices[0].delta.content or c.choices[0].finish_reason for c in token_chunks)
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in token_chunks) == full.choices[0].message.content
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_in_stream(default_server, read_sse):
    body = dict(prompt="Once upon a time", max_tokens=40, temperature=0, ignore_eos=True)
    text = "".join(e["choices"][0]["text"] for e in stream_completion(default_server, read_sse, **body)[:-1])
    stop = text[len(text) // 2: len(text) // 2 + 2]
    events = stream_completion(default_server, read_sse, **body, stop=stop)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text[: text.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def wait_until_idle(server, read_metric, deadline_s=60.0):
    """Poll /metrics until nothing runs and the KV pool is empty; returns the last (running, kv usage)."""
    deadline = time.monotonic() + deadline_s
    while True:
        running = read_metric(server, "vllm:num_requests_running")
        usage = read_metric(server, "vllm:kv_cache_usage_perc")
        if (running, usage) == (0, 0.0) or time.monotonic() > deadline:
            return running, usage
        time.sleep(0.2)


def test_disconnect_mid_stream_frees_blocks(default_server, read_sse, read_metric):
    assert wait_until_idle(default_server, read_metric) == (0, 0.0)
    tokens_before = read_metric(default_server, "vllm:generation_tokens_total")
    max_tokens = 2000
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", default_server.url + "/v1/completions",
                           json=dict(prompt="a long story", max_tokens=max_tokens, ignore_eos=True,
                                     stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = 0
            while received < 3:
                received += next(lines).startswith("data: ")
            # the request is live: it holds KV blocks right now
            assert read_metric(default_server, "vllm:num_requests_running") >= 1
            assert read_metric(default_server, "vllm:kv_cache_usage_perc") > 0
        # leaving the block closes the connection mid-stream
    assert wait_until_idle(default_server, read_metric) == (0, 0.0)
    generated = read_metric(default_server, "vllm:generation_tokens_total") - tokens_before
    assert generated < max_tokens, "the request ran to completion instead of being aborted"


def test_disconnect_while_waiting_for_a_full_response_frees_blocks(default_server, read_metric):
    assert wait_until_idle(default_server, read_metric) == (0, 0.0)
    tokens_before = read_metric(default_server, "vllm:generation_tokens_total")
    max_tokens = 2000
    with pytest.raises(httpx.ReadTimeout):
        # the client gives up long before 2000 tokens are done; the server must notice and stop
        httpx.post(default_server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.2),
                   json=dict(prompt="another long story", max_tokens=max_tokens, ignore_eos=True))
    assert wait_until_idle(default_server, read_metric) == (0, 0.0)
    generated = read_metric(default_server, "vllm:generation_tokens_total") - tokens_before
    assert generated < max_tokens, "the request ran to completion instead of being aborted"


def test_streamed_token_ids_add_up_to_the_full_responses(default_server, read_sse):
    body = {"prompt": "the quiet river", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    full = httpx.post(default_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", default_server.url + "/v1/completions", json=body | {"stream": True},
                      timeout=60) as r:
        events = read_sse(r)
    chunks = [e["choices"][0] for e in events if isinstance(e, dict) and e["choices"]]
    assert [t for c in chunks for t in c["token_ids"]] == full["token_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
