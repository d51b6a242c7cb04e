"""semipd.loadgen.workload: the trace both `semipd bench` and `semipd simulate` replay. Its arrivals have the asked
mean rate and burstiness, it is the same for the same seed, a sweep keeps the lengths and only scales the gaps,
and a bad length form or JSONL file is one clear ValueError."""
import json
import statistics

import pytest

from semipd.loadgen.workload import LengthDist, Workload, parse_length, read_jsonl

pytestmark = pytest.mark.unit


def gaps(wl: Workload) -> list[float]:
    reqs = wl.requests()
    return [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_asked_mean_rate_and_shape(burstiness):
    g = gaps(Workload(rate=5.0, burstiness=burstiness, num_requests=20001, seed=3))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(1 / 5.0, rel=0.03)
    # a gamma of shape k has coefficient of variation 1/sqrt(k): 1 for Poisson, larger when burstier
    cv = statistics.pstdev(g) / mean
    assert cv == pytest.approx(burstiness ** -0.5, rel=0.05)


def test_first_request_at_zero_and_arrivals_increase():
    reqs = Workload(rate=2, num_requests=50).requests()
    assert reqs[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert [r.index for r in reqs] == list(range(50))


def test_same_seed_same_trace_other_seed_other_trace():
    wl = Workload(rate=3, input=parse_length("uniform:10:500"), output=parse_length("lognormal:100"),
                  num_requests=200, seed=7)
    assert wl.requests() == Workload(**{**wl.__dict__}).requests()
    other = Workload(rate=3, input=wl.input, output=wl.output, num_requests=200, seed=8).requests()
    assert [r.prompt_tokens for r in other] != [r.prompt_tokens for r in wl.requests()]


def test_a_sweep_keeps_the_lengths_and_scales_the_gaps():
    wl = Workload(rate=1, input=parse_length("uniform:10:500"), output=parse_length("uniform:1:64"),
                  num_requests=100, seed=1)
    slow, fast = wl.requests(), wl.at_rate(4).requests()
    assert [(r.prompt_tokens, r.output_tokens) for r in slow] == [(r.prompt_tokens, r.output_tokens) for r in fast]
    for a, b in zip(slow, fast):
        assert b.arrival_s == pytest.approx(a.arrival_s / 4)


def test_duration_stops_the_trace():
    reqs = Workload(rate=10, duration_s=5.0, seed=2).requests()
    assert all(r.arrival_s <= 5.0 for r in reqs)
    assert 30 < len(reqs) < 80


def test_length_forms():
    assert parse_length("128") == LengthDist("fixed", mean=128)
    assert parse_length("fixed:64").draw(None) == 64
    u = parse_length("uniform:10:20")
    assert (u.kind, u.low, u.high) == ("uniform", 10, 20)
    ln = parse_length("lognormal:256:0.5:16:1024")
    assert (ln.kind, ln.mean, ln.sigma, ln.low, ln.high) == ("lognormal", 256, 0.5, 16, 1024)
    import random
    rng = random.Random(0)
    draws = [ln.draw(rng) for _ in range(5000)]
    assert min(draws) >= 16 and max(draws) <= 1024
    assert statistics.median(draws) == pytest.approx(256, rel=0.06)


@pytest.mark.parametrize("text", ["", "abc", "uniform:10", "uniform:20:10", "lognormal", "fixed:0", "gauss:3",
                                  "uniform:a:b"])
def test_bad_lengths_say_the_accepted_forms(text):
    with pytest.raises(ValueError, match="length"):
        parse_length(text)


@pytest.mark.parametrize("kwargs, match", [
    ({"rate": 0, "num_requests": 1}, "rate"),
    ({"rate": 1, "burstiness": 0, "num_requests": 1}, "burstiness"),
    ({"rate": 1}, "num_requests or duration"),
    ({"rate": 1, "num_requests": 0}, "num_requests"),
    ({"rate": 1, "duration_s": -1}, "duration"),
])
def test_bad_workloads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Workload(**kwargs)


def test_jsonl_of_lengths(tmp_path):
    f = tmp_path / "lens.jsonl"
    f.write_text("\n".join(json.dumps({"input_tokens": i, "output_tokens": o}) for i, o in [(10, 5), (20, 6)])
                 + "\n\n")
    inp, out, prompts = read_jsonl(f)
    assert inp.values == (10, 20) and out.values == (5, 6) and prompts == ()
    wl = Workload(rate=1, input=inp, output=out, num_requests=20)
    assert {r.prompt_tokens for r in wl.requests()} <= {10, 20}


def test_jsonl_of_lengths_without_outputs_keeps_the_output_flag(tmp_path):
    f = tmp_path / "lens.jsonl"
    f.write_text('{"input_tokens": 10}\n{"input_tokens": 30, "output_tokens": 4}\n')
    inp, out, _ = read_jsonl(f)
    assert inp.values == (10, 30) and out is None


def test_jsonl_of_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello there", "output_tokens": 3}\n{"prompt": "bye"}\n')
    _, _, prompts = read_jsonl(f)
    assert prompts == (("hello there", 3), ("bye", None))
    reqs = Workload(rate=1, output=parse_length("7"), num_requests=4, prompts=prompts).requests()
    assert [(r.prompt, r.output_tokens) for r in reqs] == [("hello there", 3), ("bye", 7)] * 2


@pytest.mark.parametrize("content, match", [
    ("not json\n", r":1: not JSON"),
    ("[1, 2]\n", r":1: each line must be a JSON object"),
    ('{"input_tokens": 3}\n{"foo": 1}\n', r":2: needs \"prompt\""),
    ('{"input_tokens": 0}\n', r":1: needs"),
    ('{"input_tokens": 3, "output_tokens": -1}\n', r":1: output_tokens must be a positive integer"),
    ('{"prompt": ""}\n', r":1: prompt must be a non-empty string"),
    ('{"prompt": "a"}\n{"input_tokens": 3}\n', "mixes prompts and lengths"),
    ("\n\n", "no requests"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_jsonl(f)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_jsonl(tmp_path / "nope.jsonl")
