"""How a request ends: at the model's EOS unless ignore_eos, at a requested stop token id, at max_tokens. The
EOS case uses a copy of the tiny model whose EOS is a token its greedy output is known to produce."""
import json
import shutil

import httpx
import pytest

pytestmark = pytest.mark.engine

PROMPT = [11, 12, 13, 14, 15]


def complete(server, **body):
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"prompt": PROMPT, "temperature": 0, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    return choice, r.json()["usage"]["completion_tokens"]


def first_new_token(tokens: list[int], start: int) -> tuple[int, int]:
    """(index, token) of the first token at or after `start` that does not occur earlier in the output."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i, tokens[i]
    pytest.skip("the greedy output repeats one token throughout")


@pytest.fixture(scope="module")
def greedy_tokens(start_server_module):
    choice, _ = complete(start_server_module(), max_tokens=24, ignore_eos=True)
    return choice["token_ids"]


def test_a_stop_token_id_ends_the_request_on_that_token(start_server_module, greedy_tokens):
    index, token = first_new_token(greedy_tokens, 3)
    server = start_server_module()
    choice, n = complete(server, max_tokens=24, ignore_eos=True, stop_token_ids=[token])
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"] == greedy_tokens[:index + 1] and n == index + 1


def test_eos_ends_the_request_unless_ignore_eos(tmp_path, start_server, tiny_llama_dir, greedy_tokens):
    index, token = first_new_token(greedy_tokens, 3)
    model = tmp_path / "eos-llama"
    shutil.copytree(tiny_llama_dir, model)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((model / name).read_text())
        data["eos_token_id"] = token
        (model / name).write_text(json.dumps(data))
    server = start_server("--model", str(model))
    choice, n = complete(server, max_tokens=24)
    assert choice["finish_reason"] == "stop" and n == index + 1
    assert choice["token_ids"] == greedy_tokens[:index + 1]
    choice, n = complete(server, max_tokens=24, ignore_eos=True)
    assert choice["finish_reason"] == "length" and n == 24
