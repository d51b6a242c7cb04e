"""`--model hf://ORG/NAME`: the model is fetched from the Hub into --download-dir, served under its repo id,
and found there again on the next start, even with the Hub out of reach. The Hub is a stand-in
(tests/engine/hub_standin.py): this machine cannot reach the real one. A URI that cannot work stops start-up
with one clear line."""
import subprocess
import sys

import httpx
import pytest

from hub_standin import HubStandIn

pytestmark = pytest.mark.engine


@pytest.fixture
def hub(tiny_llama_dir):
    standin = HubStandIn(tiny_llama_dir, "org/tiny")
    yield standin
    standin.close()


def test_an_hf_model_is_fetched_once_served_under_its_repo_id_and_found_again_offline(start_server, hub, tmp_path):
    downloads = tmp_path / "models"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    server = start_server("--model", "hf://org/tiny", "--download-dir", str(downloads), env=env)
    assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "org/tiny"
    r = httpx.post(server.url + "/v1/completions", json={"model": "org/tiny", "prompt": "hello", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert (downloads / "org--tiny" / "model.safetensors").exists()
    assert "fetching org/tiny from the Hugging Face Hub" in server.log()
    fetched = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert any(p.endswith("model.safetensors") for p in fetched)
    server.stop()

    hub.close()                                       # the Hub gone: the copy fetched before is served
    again = start_server("--model", "hf://org/tiny", "--download-dir", str(downloads), env=env)
    assert httpx.get(again.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "org/tiny"
    assert "fetched org/tiny into" in again.log()


@pytest.mark.parametrize("uri,said", [
    ("hf://org/missing", "cannot fetch it from the Hugging Face Hub"),
    ("s3://bucket/model", "s3:// models are not fetched"),
    ("hf://just-a-name", "expected hf://ORG/NAME"),
])
def test_a_uri_that_cannot_work_stops_start_up_with_one_line(hub, tmp_path, uri, said):
    import os
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-m", "semipd.runtime.cli", "serve", "--model", uri, "--download-dir",
                           str(tmp_path), "--port", "0"], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
