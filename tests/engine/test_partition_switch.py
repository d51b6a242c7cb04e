"""Moving SMs between the phases under load loses nothing: 100 random switches through the admin API while
requests stream, and every response is complete and identical to a run without switches."""
import concurrent.futures as cf
import json
import random
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.engine

TOKEN = "switch-test-token"
PROMPTS = [f"story number {i} about the {w}" for i, w in enumerate(
    "river king stone garden silver letter mountain window bread music winter paper".split())]


def stream_text(url, prompt):
    text, finish, done = "", None, False
    with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice.get("finish_reason") or finish
    return text, finish, done


def run_load(url):
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: stream_text(url, p), PROMPTS))


def test_random_switches_under_streaming_load(start_server, read_metric):
    server = start_server("--partition-backend", "cpu", "--sm-split", "prefill=64", "--max-num-batched-tokens", "16",
                          env={"SEMIPD_ADMIN_TOKEN": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    baseline = dict(zip(PROMPTS, run_load(server.url)))
    assert all(finish == "length" and done for _, finish, done in baseline.values())

    rng = random.Random(0)
    allowed = httpx.get(server.url + "/admin/partition", headers=auth).json()["allowed_prefill_sms"]
    applied_seen, answers, streaming_at_switch = set(), [], []
    switching_done = threading.Event()
    in_flight = [0]
    lock = threading.Lock()

    def keep_streaming(prompt):
        """Streams the same prompt again and again until the switching is over: continuous load."""
        results = []
        while not switching_done.is_set():
            with lock:
                in_flight[0] += 1
            try:
                results.append(stream_text(server.url, prompt))
            finally:
                with lock:
                    in_flight[0] -= 1
        return prompt, results

    def switch():
        with httpx.Client(timeout=30) as client:
            while in_flight[0] < len(PROMPTS) // 2:
                time.sleep(0.01)
            for i in range(100):
                value = rng.choice(allowed) if i % 2 else round(rng.uniform(0.05, 0.95), 2)
                streaming_at_switch.append(in_flight[0])
                answers.append(client.put(server.url + "/admin/partition", headers=auth,
                                          json={"prefill": value}).status_code)
                applied_seen.add(client.get(server.url + "/admin/partition", headers=auth).json()["applied"]["decode"])
        switching_done.set()

    with cf.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        loads = [pool.submit(keep_streaming, p) for p in PROMPTS]
        pool.submit(switch).result()
        outcomes = [f.result() for f in loads]

    assert answers == [200] * 100
    assert min(streaming_at_switch) > 0, "every switch must land while requests are streaming"
    completed = 0
    for prompt, results in outcomes:
        for result in results:
            assert result == baseline[prompt], f"{prompt!r} changed, failed or was cut short while the split moved"
            completed += 1
    assert completed >= len(PROMPTS)
    assert len(applied_seen) > 1, "the workers never ran on more than one split during the load"
    assert read_metric(server, "semipd:partition_switches_total") > 1
    final = httpx.get(server.url + "/admin/partition", headers=auth).json()
    assert read_metric(server, "semipd:sm_count", phase="prefill") == final["prefill_sms"]
    assert final["source"] == "admin-api"
