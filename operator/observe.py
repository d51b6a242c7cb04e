"""From Prometheus to the policy's observations: one PromQL query per quantity, over every pod of a service at
once (grouped by the pod label the PodMonitor or scrape config gives), then one Observation per pod.

Percentiles come from the histograms (histogram_quantile over rate(..._bucket[window])), never from averages.
A pod that Prometheus has no series for has sample_age None (missing); a pod whose series exist but saw no
request in the window is zero traffic, which is a measurement, not a gap."""
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from semipd.operator.prometheus import Prometheus
from semipd.operator.spec import ServiceSpec
from semipd.policy import Observation


QUERY_WORKERS = 6


@dataclass(frozen=True)
class Figures:
    """The service as a whole over the window (what status.slo and the printer columns show)."""
    ttft_s: float | None
    tpot_s: float | None


def selector(spec: ServiceSpec, pods: list[str], extra: str = "") -> str:
    p = spec.prometheus
    # regex-escaped for RE2, then the backslashes escaped again for the PromQL string literal
    names = "|".join(re.escape(n).replace("\\", "\\\\") for n in sorted(pods))
    return f'{{{p.namespace_label}="{spec.namespace}",{p.pod_label}=~"{names}"{extra}}}'


def queries(spec: ServiceSpec, pods: list[str]) -> dict[str, str]:
    """PromQL for each quantity, each a vector with one sample per pod (by the pod label)."""
    sel, by = selector(spec, pods), f"by ({spec.prometheus.pod_label})"
    prefill, decode = selector(spec, pods, ',phase="prefill"'), selector(spec, pods, ',phase="decode"')
    w = f"[{spec.slo.window_seconds}s]"
    q = spec.slo.percentile / 100

    def quantile(hist: str) -> str:
        return f"histogram_quantile({q:g}, sum by ({spec.prometheus.pod_label}, le) (rate({hist}_bucket{sel}{w})))"

    return {
        "ttft": quantile("vllm:time_to_first_token_seconds"),
        "tpot": quantile("vllm:request_time_per_output_token_seconds"),
        "requests": f"sum {by} (increase(semipd:request_arrivals_total{sel}{w}))",
        "arrival_rate": f"sum {by} (rate(semipd:request_arrivals_total{sel}{w}))",
        "prompt_rate": f"sum {by} (rate(semipd:arrived_prompt_tokens_total{sel}{w}))",
        "prompt_throughput": f"sum {by} (rate(vllm:prompt_tokens_total{sel}{w}))",
        "output_rate": f"sum {by} (rate(vllm:generation_tokens_total{sel}{w}))",
        "preemption_rate": f"sum {by} (rate(vllm:num_preemptions_total{sel}{w}))",
        "prefill_busy": f"sum {by} (rate(semipd:step_seconds_sum{prefill}{w}))",
        "waiting": f"sum {by} (vllm:num_requests_waiting{sel})",
        "handoff": f"sum {by} (semipd:queue_length{decode})",
        "kv_usage": f"max {by} (vllm:kv_cache_usage_perc{sel})",
        "prefill_sms": f"sum {by} (semipd:sm_count{prefill})",
        "decode_sms": f"sum {by} (semipd:sm_count{decode})",
        "split_changes": f"sum {by} (changes(semipd:sm_count{prefill}{w}))",
        "age": f"time() - max {by} (timestamp(vllm:num_requests_running{sel}))",
    }


def service_queries(spec: ServiceSpec, pods: list[str]) -> dict[str, str]:
    sel, w, q = selector(spec, pods), f"[{spec.slo.window_seconds}s]", spec.slo.percentile / 100
    return {k: f"histogram_quantile({q:g}, sum by (le) (rate({h}_bucket{sel}{w})))"
            for k, h in (("ttft", "vllm:time_to_first_token_seconds"),
                         ("tpot", "vllm:request_time_per_output_token_seconds"))}


def read(prom: Prometheus, spec: ServiceSpec, pods: list[str]) -> tuple[list[Observation], Figures]:
    """Query Prometheus (PrometheusError if it cannot answer) and build one Observation per pod."""
    if not pods:
        return [], Figures(None, None)
    label = spec.prometheus.pod_label
    per_pod, whole = queries(spec, pods), service_queries(spec, pods)
    # side by side: one read is ~17 queries, and each decision waits for all of them
    with ThreadPoolExecutor(max_workers=QUERY_WORKERS) as pool:
        answers = dict(zip([*per_pod, *(f"service:{k}" for k in whole)],
                           pool.map(prom.query, [*per_pod.values(), *whole.values()])))
    values: dict[str, dict[str, float]] = {}
    for key in per_pod:
        for sample in answers[key]:
            pod = sample.labels.get(label)
            if pod in pods:
                values.setdefault(pod, {})[key] = sample.value
    service = {k: _first(answers[f"service:{k}"]) for k in whole}
    return [observation(p, values.get(p, {}), spec.slo.window_seconds) for p in pods], \
        Figures(_latency(service["ttft"]), _latency(service["tpot"]))


def observation(pod: str, v: dict[str, float], window_s: float) -> Observation:
    if "age" not in v or "requests" not in v:
        # no series at all, or fewer than two scrapes inside the window (increase() has nothing to compare: a
        # gap, not zero traffic; the engine exports the arrivals counter from its start)
        return Observation(pod, split=None, sample_age_s=None)
    requests = _count(v.get("requests"))
    waiting = _count(v.get("waiting"))
    ttft = _latency(v.get("ttft"))
    if ttft is None and waiting > 0 and requests > 0:
        # requests arrived and wait, yet none got a first token in the whole window: TTFT is at least the window
        ttft = float(window_s)
    prefill, decode = v.get("prefill_sms"), v.get("decode_sms")
    split = prefill / (prefill + decode) if prefill is not None and decode and prefill + decode > 0 else None
    return Observation(
        pod, split=split, split_stable=_count(v.get("split_changes")) == 0,
        ttft_s=ttft, tpot_s=_latency(v.get("tpot")), requests=requests,
        arrival_rate=_count(v.get("arrival_rate")), prompt_rate=_count(v.get("prompt_rate")),
        prompt_throughput=_count(v.get("prompt_throughput")), output_rate=_count(v.get("output_rate")),
        waiting=waiting, handoff=_count(v.get("handoff")), kv_usage=_count(v.get("kv_usage")),
        preemption_rate=_count(v.get("preemption_rate")),
        prefill_busy=_share(v.get("prefill_busy")),
        sample_age_s=max(0.0, v["age"]))


def _first(samples) -> float | None:
    return samples[0].value if samples else None


def _latency(value: float | None) -> float | None:
    """A quantile over no observations is NaN: no request contributed (the caller decides what that means)."""
    return None if value is None or math.isnan(value) else value


def _share(value: float | None) -> float | None:
    """A busy share: absent (no prefill step yet) is unknown; NaN stays NaN; a rate that rounding puts above 1
    is 1."""
    return None if value is None else value if math.isnan(value) else min(1.0, value)


def _count(value: float | None) -> float:
    """Rates and gauges: an absent series (a counter not incremented since start) is zero; NaN stays NaN so the
    policy refuses it."""
    return 0.0 if value is None else value
