"""Several stop strings: the text is cut at the earliest place any of them occurs, whatever their order in the
list, streamed or not. Each seed first samples its text without stops; the same seed with stops then produces
the same tokens up to the cut (a request's seed fixes its tokens whatever else runs), so the expected answer
is that text cut before the first occurrence of any stop string."""
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.engine

SEEDS = range(40)
STOPS_PER_REQUEST = 5
BODY = dict(max_tokens=32, temperature=1.0, ignore_eos=True)


def complete(url: str, **body) -> tuple[str, str]:
    r = httpx.post(url + "/v1/completions", json=BODY | body, timeout=120)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    return choice["text"], choice["finish_reason"]


def complete_streamed(url: str, **body) -> tuple[str, str]:
    text, finish = [], None
    with httpx.stream("POST", url + "/v1/completions", json=BODY | body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                [choice] = json.loads(line[6:])["choices"]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def stop_set(text: str, seed: int) -> list[str]:
    """Five distinct characters of the text (so several often fall in one token), in random order."""
    rng = random.Random(seed)
    chars = sorted(set(text) - {"\ufffd"})        # a replacement character is not text the model chose
    return rng.sample(chars, min(STOPS_PER_REQUEST, len(chars)))


def earliest_cut(text: str, stops: list[str]) -> str:
    return text[:min(text.find(s) for s in stops if s in text)]


def check_seed(url: str, seed: int) -> tuple[bool, list[str]]:
    prompt = f"seed {seed} says"
    full, finish = complete(url, prompt=prompt, seed=seed)
    assert finish == "length"
    stops = stop_set(full, seed)
    assert stops, full
    expected = earliest_cut(full, stops)
    problems = []
    for how, run in (("full", complete), ("streamed", complete_streamed)):
        text, finish = run(url, prompt=prompt, seed=seed, stop=stops)
        if (text, finish) != (expected, "stop"):
            problems.append(f"seed {seed} {how}: stop={stops!r} gave {text!r} ({finish}), expected {expected!r}")
        if any(s in text for s in stops):
            problems.append(f"seed {seed} {how}: {text!r} contains a stop string of {stops!r}")
    # would cutting at the first string of the list that matches have given another answer?
    first_listed = next(s for s in stops if s in full)
    return full.find(first_listed) != len(expected), problems


def test_several_stop_strings_cut_at_the_earliest_match(default_server):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: check_seed(default_server.url, seed), SEEDS))
    problems = [p for _, seed_problems in results for p in seed_problems]
    assert not problems, "\n".join(problems)
    # the seeds exercise the ordering: in many the list's first match is not the earliest one
    assert sum(order_matters for order_matters, _ in results) >= len(SEEDS) // 4
