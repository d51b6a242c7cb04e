"""The OpenAI surface over real HTTP: models card, completions and chat (non-streaming here), lengths, stops,
seeds, and what the server logs."""
import httpx
import openai
import pytest
from transformers import AutoTokenizer

from semipd.runtime.protocol import COMPLETION_DEFAULT_MAX_TOKENS

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 2048  # default_server's --max-model-len


@pytest.fixture(scope="module")
def client(default_server):
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def complete(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_card(default_server, tiny_llama_dir):
    r = httpx.get(default_server.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == tiny_llama_dir.name
    assert card["object"] == "model"
    assert card["owned_by"] == "semipd"
    assert card["root"] == str(tiny_llama_dir)
    assert card["parent"] is None
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert card["permission"] == []
    assert isinstance(card["created"], int) and card["created"] > 0


def test_openai_client_lists_the_model(client, tiny_llama_dir):
    assert [m.id for m in client.models.list()] == [tiny_llama_dir.name]


def test_health_and_metrics(default_server):
    assert httpx.get(default_server.url + "/health", timeout=10).status_code == 200
    r = httpx.get(default_server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"):
        assert name in r.text


def test_completion_fields_and_usage(default_server, tiny_llama_dir, tokenizer):
    prompt = "The quick brown fox"
    body = complete(default_server, model=tiny_llama_dir.name, prompt=prompt, max_tokens=12, temperature=0,
                    ignore_eos=True)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == tiny_llama_dir.name
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and choice["text"]
    prompt_tokens = len(tokenizer(prompt).input_ids)
    usage = dict(body["usage"])
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]   # the shared server may have seen the prompt
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}
    assert 0 <= cached < prompt_tokens


def test_token_id_prompt_counts_those_tokens(default_server):
    ids = [5, 17, 42, 99, 7, 3]
    body = complete(default_server, prompt=ids, max_tokens=4, temperature=0, ignore_eos=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 4
    # a one-element batch is the same request
    again = complete(default_server, prompt=[ids], max_tokens=4, temperature=0, ignore_eos=True)
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


def test_model_may_be_omitted(default_server):
    body = complete(default_server, prompt="hi", max_tokens=2, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 2


def test_completion_default_length_is_openais_16(default_server):
    body = complete(default_server, prompt="hello", temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == COMPLETION_DEFAULT_MAX_TOKENS
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_default_length_fills_the_context(client, tiny_llama_dir, tokenizer):
    # a prompt that leaves ~64 tokens, so filling the context stays quick
    per_word = len(tokenizer("word " * 100, add_special_tokens=False).input_ids) / 100
    content = "word " * int((MAX_MODEL_LEN - 100) / per_word)
    out = client.chat.completions.create(model=tiny_llama_dir.name, messages=[{"role": "user", "content": content}],
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens > 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == MAX_MODEL_LEN


def test_chat_applies_the_template_with_generation_prompt(client, tiny_llama_dir, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages, max_completion_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")       # the ChatML generation prompt is there
    assert out.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_chat_accepts_text_parts_and_max_tokens(client, tiny_llama_dir):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    joined = client.chat.completions.create(model=tiny_llama_dir.name, temperature=0, max_tokens=5,
                                            messages=[{"role": "user", "content": parts}])
    plain = client.chat.completions.create(model=tiny_llama_dir.name, temperature=0, max_tokens=5,
                                           messages=[{"role": "user", "content": "Hello world"}])
    # the same prompt tokens (the second request may find them in the prefix cache)
    assert (joined.usage.prompt_tokens, joined.usage.completion_tokens) == \
        (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert joined.choices[0].message.content == plain.choices[0].message.content


def test_max_tokens_finishes_with_length(default_server):
    for n in (1, 7):
        body = complete(default_server, prompt="count", max_tokens=n, ignore_eos=True)
        assert body["usage"]["completion_tokens"] == n
        assert body["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_text(default_server):
    base = complete(default_server, prompt="Once upon a time", max_tokens=40, temperature=0, ignore_eos=True)
    text = base["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop, text
    cut = complete(default_server, prompt="Once upon a time", max_tokens=40, temperature=0, ignore_eos=True,
                   stop=[stop, "\u2603never"])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["usage"]["completion_tokens"] < 40


def test_greedy_is_deterministic(default_server):
    a = complete(default_server, prompt="abc", max_tokens=20, temperature=0, ignore_eos=True)
    b = complete(default_server, prompt="abc", max_tokens=20, temperature=0, ignore_eos=True)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_seed_reproduces_sampled_text(default_server):
    def sampled(seed):
        return complete(default_server, prompt="Tell me", max_tokens=24, temperature=1.0, top_p=0.95, top_k=50,
                        seed=seed, ignore_eos=True)["choices"][0]["text"]
    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(4321) != first


def test_unknown_and_ignored_fields_are_accepted(default_server):
    body = complete(default_server, prompt="x", max_tokens=2, ignore_eos=True, user="someone",
                    some_future_field={"a": 1}, presence_penalty=0, logprobs=None, n=1)
    assert body["usage"]["completion_tokens"] == 2


def test_prompts_are_not_logged(default_server):
    marker = "zebra-marker-8c1f"
    complete(default_server, prompt=f"secret {marker}", max_tokens=2)
    assert "POST /v1/completions" in default_server.log()     # the log is being written
    assert marker not in default_server.log()
