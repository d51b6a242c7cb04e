"""Automatic prefix caching through the real server: a repeated prefix is served from the pool's cached blocks
(vLLM's counters and OpenAI's usage.prompt_tokens_details.cached_tokens say so) and the output is still the
cold run's, token for token, against transformers, with chunked prefill and preemption on the path."""
import concurrent.futures as cf
import random

import httpx
import pytest

from test_parity import MAX_TOKENS, reference

pytestmark = pytest.mark.engine

BLOCK = 16
WORDS = "the king river stone light morning garden silver quiet north letter bread window road music".split()


def shared_prefix_prompts(n, seed):
    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(30))          # a "system prompt" of ~90 tokens, shared
    return [system + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def complete(url, prompt, **extra):
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                         **extra})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["token_ids"], body["choices"][0]["text"], body["usage"]


def complete_many(url, prompts):
    """All prompts in one request: they reach the engine in the same instant, whatever the machine's load."""
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    body = r.json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    return [(c["token_ids"], c["text"]) for c in choices], body["usage"]


def test_shared_prefixes_hit_the_cache_and_keep_transformers_parity_with_chunking_and_preemption(
        start_server, tiny_llama_dir, read_metric):
    prompts = shared_prefix_prompts(14, seed=3)
    expected = reference(tiny_llama_dir, prompts)
    server = start_server("--max-num-batched-tokens", "32", "--num-kv-blocks", "24", "--max-model-len", "256")
    first = complete(server.url, prompts[0])                             # cold: computes and caches the prefix
    assert first[2]["prompt_tokens_details"]["cached_tokens"] == 0
    # six prompts on connections of their own; seven in one request, whose prompts and outputs alone need ~33
    # blocks of the 24, so preemption happens however the connections interleave on a loaded machine
    singles, batched = prompts[1:7], prompts[7:]
    with cf.ThreadPoolExecutor(len(singles) + 1) as pool:
        batch = pool.submit(complete_many, server.url, batched)
        rest = list(pool.map(lambda p: complete(server.url, p), singles))
        batch_outputs, batch_usage = batch.result()
    got = [first[:2]] + [r[:2] for r in rest] + batch_outputs
    for prompt, g, e in zip(prompts, got, expected):
        assert g == e, f"prompt {prompt[:40]!r}...: server {g} != transformers {e}"
    usages = [u for *_, u in rest] + [batch_usage]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert max(cached) >= 4 * BLOCK, f"the shared ~90-token prefix should come from the cache: {cached}"
    assert all(c % BLOCK == 0 and c < u["prompt_tokens"] for c, u in zip(cached, usages))
    assert read_metric(server, "vllm:prefix_cache_hits_total") >= sum(cached)
    assert read_metric(server, "vllm:prefix_cache_queries_total") >= sum(
        u["prompt_tokens"] for u in [first[2]] + usages)
    assert read_metric(server, "vllm:num_preemptions_total") > 0, "the KV pool was meant to force preemption"


def test_an_identical_prompt_is_served_from_the_cache_but_its_last_token_is_computed(start_server,
                                                                                      tiny_llama_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    server = start_server("--max-model-len", "256")
    words = random.Random(5).choices(WORDS, k=200)
    for k in range(20, 200):           # a prompt of exactly 4 full blocks: all cached but the last block
        prompt = " ".join(words[:k])
        if len(tokenizer(prompt).input_ids) == 4 * BLOCK:
            break
    else:
        pytest.fail("no prompt of exactly 64 tokens found")
    cold = complete(server.url, prompt)
    warm = complete(server.url, prompt, stream=False)
    assert warm[:2] == cold[:2]
    assert cold[2]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm[2]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK


def test_streamed_usage_reports_cached_tokens(start_server, read_sse):
    server = start_server("--max-model-len", "256")
    prompt = shared_prefix_prompts(1, seed=9)[0]
    complete(server.url, prompt)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        events = read_sse(r)
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4 * BLOCK


def test_prefix_caching_can_be_turned_off(start_server, read_metric):
    server = start_server("--max-model-len", "256", "--no-enable-prefix-caching")
    prompt = shared_prefix_prompts(1, seed=4)[0]
    outs = [complete(server.url, prompt) for _ in range(2)]
    assert outs[0][:2] == outs[1][:2]
    assert [u["prompt_tokens_details"]["cached_tokens"] for *_, u in outs] == [0, 0]
    assert read_metric(server, "vllm:prefix_cache_hits_total") == 0
    assert "prefix caching off" in server.log()
