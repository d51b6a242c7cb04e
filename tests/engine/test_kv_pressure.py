"""Liveness under KV pressure through the real server: long prompts and concurrent decodes, arriving at seeded
random times, drive pools of several sizes dry. Every request must finish with the output an uncontended run
gives (one request at a time on a large pool), whatever the preemptions; their counts are printed (-s)."""
import concurrent.futures as cf
import random
import time

import httpx
import pytest

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 256                    # 16 blocks: the largest request fits even the smallest pool below
WORDS = "the king river stone light morning garden silver quiet north letter bread window road music".split()


def workload(seed, n=20):
    rng = random.Random(seed)
    # ~2.4 tokens a word: prompts of roughly 25 to 160 tokens, some sharing a start, outputs of 16 to 72 tokens
    shared = " ".join(rng.choice(WORDS) for _ in range(20))
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 45)))
        out.append({"prompt": (shared + " " + words) if rng.random() < 0.4 else words,
                    "max_tokens": rng.randint(16, 72), "delay": rng.uniform(0, 1.0)})
    return out


def complete(url, req):
    r = httpx.post(url + "/v1/completions", timeout=600,
                   json={"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["finish_reason"]


def contended(url, reqs):
    def send(req):
        time.sleep(req["delay"])
        return complete(url, req)
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(send, reqs))


def test_every_request_finishes_with_uncontended_output_when_the_pool_runs_dry(start_server, read_metric):
    reqs = workload(seed=11)
    alone = start_server("--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "400",
                         "--no-enable-prefix-caching")
    expected = [complete(alone.url, r) for r in reqs]
    alone.stop()
    counts = {}
    for blocks in (18, 28, 48):
        server = start_server("--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", str(blocks),
                              "--max-num-batched-tokens", "64")
        got = contended(server.url, reqs)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"pool {blocks} blocks, request {i}: {g} != uncontended {e}"
        counts[blocks] = int(read_metric(server, "vllm:num_preemptions_total"))
        server.stop()
    print(f"preemptions by pool size (blocks): {counts}")
    assert counts[18] > 0, f"the smallest pool was meant to force preemption: {counts}"
