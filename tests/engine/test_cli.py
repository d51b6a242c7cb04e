"""The `semipd` command as a user runs it: `serve` with no --model on a fresh cache, `tiny-model` for every
family, and a model that cannot be served stopping start-up with one clear line and exit status 1."""
import json
import subprocess
import sys

import httpx
import pytest

from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.engine

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def semipd(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "semipd.runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **OFFLINE, **(env or {})})


def test_serve_without_model_builds_the_embedded_default_and_serves_it(tmp_path, start_server_without_model):
    cache = tmp_path / "cache"
    server = start_server_without_model(env={"SEMIPD_CACHE": str(cache), **OFFLINE})
    try:
        [card] = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert card["id"] == "tiny-llama"
        assert card["root"] == str(cache / "models" / "tiny-llama")
        assert (cache / "models" / "tiny-llama" / "config.json").exists()
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("arch,architecture", [("qwen3", "Qwen3ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_tiny_model_command(tmp_path, arch, architecture):
    out = semipd("tiny-model", str(tmp_path / "m"), "--arch", arch)
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    tokenizer_config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert (tmp_path / "m" / "tokenizer.json").exists() and tokenizer_config.get("chat_template")


def break_architecture(model):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    return "GPT2LMHeadModel"


def break_shard(model):
    [shard] = model.glob("*.safetensors")
    shard.unlink()
    return "safetensors"


def break_shape(model):
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8
    (model / "config.json").write_text(json.dumps(config))
    return "shape"


@pytest.mark.parametrize("breakage", [break_architecture, break_shard, break_shape])
def test_a_model_that_cannot_be_served_stops_start_up_with_one_clear_error(tmp_path, breakage):
    model = write_tiny_model(tmp_path / "m")
    expected = breakage(model)
    out = semipd("serve", "--model", str(model), "--port", "0", timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    output = out.stdout + out.stderr
    assert "Traceback" not in output, output
    [line] = [l for l in output.splitlines() if "cannot start" in l]
    assert expected in line, line


def test_seed_makes_unseeded_sampling_repeat_across_restarts(start_server):
    def samples(seed):
        server = start_server("--seed", str(seed))
        texts = [httpx.post(server.url + "/v1/completions", timeout=60,
                            json={"prompt": f"story {i}", "max_tokens": 12, "temperature": 1.0}).json()
                 ["choices"][0]["text"] for i in range(3)]
        server.stop()
        return texts

    first = samples(7)
    assert samples(7) == first
    assert samples(8) != first


def test_memory_flags_that_cannot_size_a_pool_are_refused(tiny_llama_dir):
    for flags, said in ((["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
                        (["--kv-cache-memory", "0"], "--kv-cache-memory must be a positive number")):
        done = subprocess.run([sys.executable, "-m", "semipd.runtime.cli", "serve", "--model", str(tiny_llama_dir),
                               *flags], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and said in done.stderr, done.stderr


def test_max_model_len_defaults_to_what_the_pool_holds(start_server):
    server = start_server("--num-kv-blocks", "20", "--max-model-len", "default")
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert model["max_model_len"] == 20 * 16
    assert "max_model_len set to 320, what the KV pool holds for one request" in server.log()


def test_serve_help_shows_every_default_that_matters():
    out = semipd("serve", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    # past the usage line, with argparse's line wrapping undone
    help_text = " ".join(out.stdout.split("options:", 1)[1].split())
    for flag, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--graceful-timeout", "30.0"),
                          ("--max-request-body-mib", "16.0")):
        at = help_text.index(flag + " ")
        assert f"(default: {default})" in help_text[at:help_text.index("--", at + len(flag))], flag
