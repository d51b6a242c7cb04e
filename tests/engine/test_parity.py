"""Greedy output over HTTP equals transformers `generate` token for token (and so in text), for many prompts sent
at once, so batching, chunked prefill, the prefill->decode handoff and preemption-with-recompute are all on the
path."""
import concurrent.futures as cf
import random

import httpx
import pytest
import torch

pytestmark = pytest.mark.engine

MAX_TOKENS = 24


def make_prompts(tokenizer, n=22, seed=0):
    rng = random.Random(seed)
    words = ("the king river stone light morning garden silver quiet north letter bread window road music "
             "winter story friend paper mountain").split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    prompts[0] = "a"                                   # a one-token prompt
    return prompts


def reference(model_dir, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        out.append((new, tok.decode(new, skip_special_tokens=True)))
    return out


def complete(url, prompt):
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["completion_tokens"] == len(choice["token_ids"])
    return choice["token_ids"], choice["text"]


def complete_many(url, prompts):
    """All prompts in one completions request: they reach the engine in the same instant, whatever the load on
    the machine, so the KV pool's shortage (and preemption) does not hang on how fast client threads start."""
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(prompts)))
    return [(c["token_ids"], c["text"]) for c in choices]


@pytest.mark.parametrize("arch_fixture", ["tiny_llama_dir", "tiny_qwen3_dir"])
def test_greedy_matches_transformers_under_concurrency(request, start_server, read_metric, arch_fixture):
    model_dir = request.getfixturevalue(arch_fixture)
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir))
    expected = reference(model_dir, prompts)
    # a small prefill budget chunks the longer prompts; a small KV pool forces preemption and recompute
    server = start_server("--model", str(model_dir), "--max-num-batched-tokens", "24", "--num-kv-blocks", "24",
                          "--max-model-len", "256")
    # half the prompts on connections of their own (the server's concurrency), half in one request whose
    # prompts alone need about four times the pool, so preemption happens however the connections interleave
    singles, batched = prompts[:len(prompts) // 2], prompts[len(prompts) // 2:]
    with cf.ThreadPoolExecutor(len(singles) + 1) as pool:
        batch = pool.submit(complete_many, server.url, batched)
        got = list(pool.map(lambda p: complete(server.url, p), singles)) + batch.result()
    for prompt, g, e in zip(prompts, got, expected):
        assert g == e, f"prompt {prompt!r}: server {g} != transformers {e}"
    assert read_metric(server, "vllm:num_preemptions_total") > 0, "the KV pool was meant to force preemption"
    assert read_metric(server, "vllm:prompt_tokens_total") >= sum(len(p.split()) for p in prompts)


def test_greedy_matches_transformers_with_triton_kernels(start_server, tiny_llama_dir, read_metric):
    """The engine's other kernel path: the Triton kernels (here under TRITON_INTERPRET=1, which tests/conftest.py
    sets without a GPU and the server process inherits) give the same tokens as transformers."""
    import os
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(tiny_llama_dir), n=4, seed=1)
    expected = reference(tiny_llama_dir, prompts)
    server = start_server("--kernel-backend", "triton", "--max-num-batched-tokens", "24", "--max-model-len", "256")
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: complete(server.url, p), prompts))
    assert got == expected
    assert "triton kernels" in server.log()
