"""The endpoints besides generation that vLLM users and tools call: /openapi.json (a valid OpenAPI document of
the routes actually served, with their request bodies), /version, /ping, /tokenize, /detokenize (vLLM's
shapes) and GET /v1/models/{id}."""
import httpx
import jsonschema
import openai
import pytest
from openapi_spec_validator import validate
from transformers import AutoTokenizer

pytestmark = pytest.mark.engine

ROUTES = {
    "/v1/completions": {"post"}, "/v1/chat/completions": {"post"}, "/v1/models": {"get"},
    "/v1/models/{model_id}": {"get"}, "/tokenize": {"post"}, "/detokenize": {"post"}, "/version": {"get"},
    "/health": {"get"}, "/ping": {"get", "post"}, "/metrics": {"get"}, "/admin/partition": {"get", "put"},
}
MSG = [{"role": "user", "content": "How many tokens?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def post(server, path: str, status: int = 200, **body) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def test_openapi_document_describes_the_routes_served(default_server):
    r = httpx.get(default_server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    doc = r.json()
    validate(doc)                                         # a well-formed OpenAPI 3.1 document
    served = {path: set(ops) for path, ops in doc["paths"].items()}
    assert served == ROUTES
    version = httpx.get(default_server.url + "/version", timeout=10).json()["version"]
    assert doc["info"]["version"] == version

    # each JSON route names its body; the schema accepts what the server accepts and refuses what it refuses
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "415" in doc["paths"][path]["post"]["responses"]
    resolver = {"components": {"schemas": schemas}}

    def valid(model: str, instance) -> bool:
        schema = schemas[model] | resolver
        return not list(jsonschema.Draft202012Validator(schema).iter_errors(instance))

    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert valid("CompletionRequest", {"prompt": "x", "max_tokens": 3, "stream": True})
    assert not valid("CompletionRequest", {"prompt": "x", "max_tokens": "3"})
    assert valid("ChatCompletionRequest", {"messages": MSG})
    assert not valid("ChatCompletionRequest", {"messages": [{"role": "wizard", "content": "x"}]})
    assert post(default_server, "/v1/chat/completions", messages=MSG, max_tokens=1)["choices"]


def test_version_and_ping(default_server):
    r = httpx.get(default_server.url + "/version", timeout=10)
    assert r.status_code == 200 and isinstance(r.json()["version"], str) and r.json()["version"]
    assert httpx.get(default_server.url + "/ping", timeout=10).status_code == 200
    assert httpx.post(default_server.url + "/ping", timeout=10).status_code == 200


def test_tokenize_a_prompt_as_the_tokenizer_does(default_server, tokenizer):
    text = "Hello tokenizer, count me."
    body = post(default_server, "/tokenize", prompt=text)
    expected = tokenizer(text).input_ids                  # with the BOS, as /v1/completions tokenizes
    assert body == {"count": len(expected), "max_model_len": 2048, "tokens": expected, "token_strs": None}
    bare = post(default_server, "/tokenize", prompt=text, add_special_tokens=False, return_token_strs=True)
    assert bare["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])
    # the count is what a completion of that prompt is charged
    usage = post(default_server, "/v1/completions", prompt=text, max_tokens=1)["usage"]
    assert usage["prompt_tokens"] == body["count"]


def test_tokenize_messages_as_chat_completions_does(default_server, tokenizer):
    body = post(default_server, "/tokenize", messages=MSG)
    usage = post(default_server, "/v1/chat/completions", messages=MSG, max_tokens=1)["usage"]
    assert body["count"] == usage["prompt_tokens"] == len(body["tokens"])
    text = tokenizer.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    no_prompt = post(default_server, "/tokenize", messages=MSG, add_generation_prompt=False)
    assert no_prompt["count"] < body["count"] and body["tokens"][:no_prompt["count"]] == no_prompt["tokens"]


def test_detokenize_round_trips(default_server):
    text = "Round trip: caf\u00e9 \u2603"
    tokens = post(default_server, "/tokenize", prompt=text, add_special_tokens=False)["tokens"]
    assert post(default_server, "/detokenize", tokens=tokens) == {"prompt": text}


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": MSG}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": MSG, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
])
def test_tokenize_and_detokenize_refuse_bad_input(default_server, path, body, status, param):
    error = post(default_server, path, status, **body)["error"]
    assert error["param"] == param and param in error["message"]


def test_model_by_id(default_server, tiny_llama_dir):
    [card] = httpx.get(default_server.url + "/v1/models", timeout=10).json()["data"]
    r = httpx.get(default_server.url + f"/v1/models/{tiny_llama_dir.name}", timeout=10)
    assert r.status_code == 200 and r.json() == card
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0) as client:
        assert client.models.retrieve(tiny_llama_dir.name).id == tiny_llama_dir.name
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4")
    for unknown in ("gpt-4", "org/some-model"):
        r = httpx.get(default_server.url + f"/v1/models/{unknown}", timeout=10)
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and unknown in error["message"]
