"""Sampling features through the real server, each against an independent reference on the tiny model:
logprobs against a log-softmax of transformers' logits, repetition_penalty against transformers' own processor,
presence/frequency penalties against the formula applied to transformers' logits step by step, logit_bias,
n choices, echo, and several prompts in one request."""
import math

import httpx
import pytest
import torch

pytestmark = pytest.mark.engine

PROMPT = "the quiet river and the silver morning"


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


def post(server, path, **body):
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_equal_a_log_softmax_of_transformers_logits(default_server, hf):
    model, tok = hf
    body = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5,
                ignore_eos=True, return_token_ids=True)
    choice = body["choices"][0]
    prompt_ids, out_ids = choice["prompt_token_ids"], choice["token_ids"]
    lp = hf_logprobs(model, prompt_ids + out_ids)
    got = choice["logprobs"]
    assert got["tokens"] == [tok.decode([t]) for t in out_ids]
    for k, token in enumerate(out_ids):
        row = lp[len(prompt_ids) - 1 + k]
        assert math.isclose(got["token_logprobs"][k], row[token].item(), abs_tol=1e-4)
        expected_top = row.topk(5).values.tolist()
        assert sorted(got["top_logprobs"][k].values(), reverse=True) == pytest.approx(
            expected_top[:len(got["top_logprobs"][k])], abs=1e-4)
    assert got["text_offset"][0] == 0 and got["text_offset"] == sorted(got["text_offset"])
    assert "".join(got["tokens"]) == choice["text"]


def test_chat_logprobs_stream_and_full_agree_and_follow_openais_shape(default_server, read_sse):
    msgs = [{"role": "user", "content": "tell me about the river"}]
    full = post(default_server, "/v1/chat/completions", messages=msgs, max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]
    assert full["refusal"] is None and len(full["content"]) == 6
    for item in full["content"]:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and len(item["top_logprobs"]) == 3
        assert item["bytes"] == list(item["token"].encode())
        assert item["logprob"] <= 0 and item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][-1]["logprob"]
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True,
                            "top_logprobs": 3, "stream": True}) as r:
        events = read_sse(r)
    streamed = [item for e in events if isinstance(e, dict)
                for c in e["choices"] if c["logprobs"] for item in c["logprobs"]["content"]]
    assert [i["token"] for i in streamed] == [i["token"] for i in full["content"]]
    assert [i["logprob"] for i in streamed] == pytest.approx([i["logprob"] for i in full["content"]], abs=1e-5)


def test_repetition_penalty_matches_transformers_generate(default_server, hf):
    model, tok = hf
    ids = tok(PROMPT).input_ids
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=20, do_sample=False, repetition_penalty=1.8)
    expected = gen[0, len(ids):].tolist()
    got = post(default_server, "/v1/completions", prompt=ids, max_tokens=len(expected), temperature=0,
               repetition_penalty=1.8, return_token_ids=True)["choices"][0]["token_ids"]
    plain = post(default_server, "/v1/completions", prompt=ids, max_tokens=len(expected), temperature=0,
                 return_token_ids=True)["choices"][0]["token_ids"]
    assert got == expected
    assert got != plain, "the penalty was meant to change this output"


def test_presence_and_frequency_penalties_follow_openais_formula(default_server, hf):
    model, tok = hf
    ids = tok(PROMPT).input_ids
    presence, frequency = 0.7, 1.3
    out: list[int] = []
    for _ in range(20):                 # the formula, step by step, on transformers' logits
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float() \
            if out else torch.zeros_like(logits)
        out.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
    got = post(default_server, "/v1/completions", prompt=ids, max_tokens=20, temperature=0, ignore_eos=True,
               presence_penalty=presence, frequency_penalty=frequency, return_token_ids=True)
    assert got["choices"][0]["token_ids"] == out
    plain = post(default_server, "/v1/completions", prompt=ids, max_tokens=20, temperature=0, ignore_eos=True,
                 return_token_ids=True)["choices"][0]["token_ids"]
    assert plain != out, "the penalties were meant to change this output"


def test_logit_bias_forces_and_bans_tokens(default_server):
    plain = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                 return_token_ids=True)["choices"][0]["token_ids"]
    forced = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                  logit_bias={"300": 100}, return_token_ids=True)["choices"][0]["token_ids"]
    assert forced == [300] * 6
    banned = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                  logit_bias={str(plain[0]): -100}, return_token_ids=True)["choices"][0]["token_ids"]
    assert plain[0] not in banned


def test_n_choices_are_numbered_seeded_and_counted_once_for_the_prompt(default_server, read_sse):
    body = dict(prompt=PROMPT, max_tokens=10, temperature=1.0, seed=11, n=3, ignore_eos=True)
    first = post(default_server, "/v1/completions", **body)
    again = post(default_server, "/v1/completions", **body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]], "a seed repeats every choice"
    assert len(set(texts)) > 1, "the choices were meant to differ"
    single = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=1)
    assert first["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert first["usage"]["completion_tokens"] == 30
    with httpx.stream("POST", default_server.url + "/v1/completions", timeout=60,
                      json=body | {"stream": True}) as r:
        events = [e for e in read_sse(r) if isinstance(e, dict)]
    streamed = {i: "".join(c["text"] for e in events for c in e["choices"] if c["index"] == i) for i in range(3)}
    assert [streamed[i] for i in range(3)] == texts
    finishes = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]


def test_echo_and_several_prompts(default_server):
    echoed = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    plain = post(default_server, "/v1/completions", prompt=PROMPT, max_tokens=5, temperature=0)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    prompts = ["a garden", [5, 6, 7], PROMPT]
    both = post(default_server, "/v1/completions", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c["index"] for c in both["choices"]] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = post(default_server, "/v1/completions", prompt=prompt, max_tokens=5, temperature=0)
        assert [both["choices"][2 * p + i]["text"] for i in range(2)] == [alone["choices"][0]["text"]] * 2
