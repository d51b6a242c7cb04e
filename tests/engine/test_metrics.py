"""/metrics is read by tools built for vLLM (dashboards, the Gateway API Inference Extension, autoscalers): the
names, types, the model_name label and the histogram bucket edges must be vLLM's, and the counters must move
with the work done. semipd's own series sit under `semipd:`."""
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

# vLLM v1's histogram edges (vllm/v1/metrics/loggers.py), written out here as the contract, not imported
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
           960.0, 1920.0, 7680.0]

# family name as the parser reports it (counters lose _total) -> (type, bucket edges or None)
VLLM = {
    "vllm:num_requests_running": ("gauge", None),
    "vllm:num_requests_waiting": ("gauge", None),
    "vllm:kv_cache_usage_perc": ("gauge", None),
    "vllm:prompt_tokens": ("counter", None),
    "vllm:generation_tokens": ("counter", None),
    "vllm:num_preemptions": ("counter", None),
    "vllm:request_success": ("counter", None),
    "vllm:time_to_first_token_seconds": ("histogram", TTFT),
    "vllm:inter_token_latency_seconds": ("histogram", ITL),
    "vllm:request_time_per_output_token_seconds": ("histogram", ITL),
    "vllm:e2e_request_latency_seconds": ("histogram", LATENCY),
    "vllm:request_queue_time_seconds": ("histogram", LATENCY),
}
SEMIPD = {
    "semipd:sm_count": "gauge",
    "semipd:partition_switches": "counter",
    "semipd:partition_switch_seconds": "histogram",
    "semipd:queue_length": "gauge",
    "semipd:step_seconds": "histogram",
    "semipd:step_tokens": "counter",
    "semipd:request_arrivals": "counter",
    "semipd:arrived_prompt_tokens": "counter",
    "semipd:emulated_wait_seconds": "counter",
}


def families(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, **labels) -> float:
    """One sample (summed over unnamed labels) by its full name: foo_total, foo_count, ..."""
    family = next(f for base, f in fams.items() if name.startswith(base) and name[len(base):] in SUFFIXES)
    return sum(s.value for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created")


def test_vllm_names_types_labels_and_buckets(default_server, tiny_llama_dir):
    httpx.post(default_server.url + "/v1/completions", timeout=120,
               json={"prompt": "metrics", "max_tokens": 4, "temperature": 0, "ignore_eos": True}).raise_for_status()
    fams = families(default_server)
    for name, (kind, edges) in VLLM.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, (name, fams[name].type)
        for sample in fams[name].samples:
            assert sample.labels.get("model_name") == tiny_llama_dir.name, (name, sample.labels)
        if edges:
            got = sorted({float(s.labels["le"]) for s in fams[name].samples if s.name == name + "_bucket"})
            assert got == edges + [float("inf")], name


def test_semipd_series_per_phase(default_server):
    fams = families(default_server)
    for name, kind in SEMIPD.items():
        assert name in fams and fams[name].type == kind, name
    for name in ("semipd:sm_count", "semipd:queue_length"):
        assert {s.labels.get("phase") for s in fams[name].samples} == {"prefill", "decode"}, name


def test_counters_follow_the_work(default_server):
    before = families(default_server)
    body = httpx.post(default_server.url + "/v1/completions", timeout=120, json={
        "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 7
    after = families(default_server)
    assert value(after, "vllm:prompt_tokens_total") - value(before, "vllm:prompt_tokens_total") == 5
    assert value(after, "semipd:request_arrivals_total") - value(before, "semipd:request_arrivals_total") == 1
    assert value(after, "semipd:arrived_prompt_tokens_total") - \
        value(before, "semipd:arrived_prompt_tokens_total") == 5
    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") == 7
    assert value(after, "vllm:request_success_total", finished_reason="length") - \
        value(before, "vllm:request_success_total", finished_reason="length") == 1
    assert value(after, "vllm:time_to_first_token_seconds_count") - \
        value(before, "vllm:time_to_first_token_seconds_count") == 1
    # the request's prefill and its decode steps were both timed
    for phase in ("prefill", "decode"):
        assert value(after, "semipd:step_seconds_count", phase=phase) > \
            value(before, "semipd:step_seconds_count", phase=phase), phase


def test_arrivals_count_requests_still_queued(start_server, tiny_llama_dir):
    """A request waiting for a decode slot has arrived but not been prefilled: the arrival counters show it,
    vllm:prompt_tokens (counted at prefill) cannot. One decode slot, and a first request slowed by the cpu
    stand-in's SM-share emulation (decode on 12 of 132 SMs) so it holds the slot while we look."""
    server = start_server("--device", "cpu", "--partition-backend", "cpu", "--emulate-sm-share",
                          "--sm-split", "prefill=120", "--max-num-seqs", "1")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
            "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}) as first:
        lines = first.iter_lines()        # kept referenced: a dropped iterator closes the stream (an abort)
        next(lines)                                       # it holds the only slot now
        queued = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",), daemon=True,
                                  kwargs={"json": {"prompt": [9] * 11, "max_tokens": 1}, "timeout": 120})
        queued.start()
        deadline = time.monotonic() + 30
        while value(fams := families(server), "semipd:request_arrivals_total") < 2:
            assert time.monotonic() < deadline, "the second request never arrived"
            time.sleep(0.05)
        assert value(fams, "semipd:arrived_prompt_tokens_total") == 3 + 11
        assert value(fams, "vllm:prompt_tokens_total") == 3, server.log()    # the queued one is not prefilled yet
        assert value(fams, "vllm:num_requests_waiting") == 1
        lines.close()
    queued.join(60)                                       # closing the stream aborted the first: the slot frees
    assert value(families(server), "vllm:prompt_tokens_total") == 3 + 11
