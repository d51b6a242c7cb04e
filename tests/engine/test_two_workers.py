"""Prefill and decode are separate workers that run at the same time: a long prefill does not stall decode."""
import threading
import time

import httpx
import pytest

from semipd.runtime.tiny_model import write_tiny_model

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory):
    # wide enough that prefilling a few thousand tokens is one long step on a CPU
    return write_tiny_model(tmp_path_factory.mktemp("models") / "wide-llama", arch="llama", hidden_size=256,
                            intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=2,
                            max_position_embeddings=4096)


def stream_arrivals(url, body, arrivals, done, hang_up):
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.monotonic())
            if hang_up.is_set():
                break
    done.set()


def test_decode_tokens_keep_arriving_during_a_long_prefill(start_server, wider_model_dir):
    long_prompt = [10 + i % 400 for i in range(1500)]   # 1500 token ids, prefilled as ONE step (budget 4096)
    server = start_server("--model", str(wider_model_dir), "--max-model-len", "4096",
                          "--max-num-batched-tokens", "4096", "--kv-cache-memory", "1")
    arrivals, done, hang_up = [], threading.Event(), threading.Event()
    streamer = threading.Thread(target=stream_arrivals, args=(server.url, {
        "prompt": "the river", "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True},
        arrivals, done, hang_up))
    streamer.start()
    while len(arrivals) < 5:                            # the decode request is streaming
        assert not done.is_set()
        time.sleep(0.01)
    sent = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", timeout=600,
                   json={"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
    first_token_of_long = time.monotonic()
    assert r.status_code == 200, r.text
    during = [t for t in arrivals if sent < t < first_token_of_long]
    still_streaming = not done.is_set()
    hang_up.set()
    streamer.join(600)
    # With one worker doing both phases the decode stream would freeze for the whole prefill step
    assert still_streaming, "the decode request ended before the long prefill did; make it longer"
    print(f"{len(during)} decode tokens arrived during the {first_token_of_long - sent:.2f}s long prefill")
    assert len(during) >= 5, (f"only {len(during)} decode tokens arrived during the "
                              f"{first_token_of_long - sent:.2f}s the long prompt took to prefill")
