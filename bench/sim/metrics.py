"""What a simulated pod exports, in the two forms its controllers read it:

- exact recent samples and running totals (runtime/recent.py's RecentSamples on the simulated clock), which the
  in-engine SLO loop (runtime/slo_loop.py) turns into an Observation;
- cumulative Prometheus-style series: counters, gauges and histograms with vLLM's bucket edges
  (runtime/metrics.py), which a simulated Prometheus scrapes every scrape interval (`Scraper`) and the operator's
  own observation code (operator/observe.py) reads through PromQL-equivalent functions over a window.
"""
from __future__ import annotations

import bisect
import math

from semipd.runtime.metrics import ITL_BUCKETS, TTFT_BUCKETS
from semipd.runtime.recent import RecentSamples

COUNTERS = ("arrivals", "arrived_prompt_tokens", "prompt_tokens", "generation_tokens", "preemptions",
            "prefill_busy_s")
GAUGES = ("waiting", "handoff", "running", "kv_usage", "prefill_sms", "decode_sms")


class Histogram:
    __slots__ = ("edges", "counts", "total", "n")

    def __init__(self, edges: list[float]):
        self.edges = list(edges)
        self.counts = [0] * (len(edges) + 1)     # the last is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.edges, v)] += 1
        self.total += v
        self.n += 1

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


def histogram_quantile(q: float, edges: list[float], cumulative_increase: list[float]) -> float:
    """Prometheus's histogram_quantile over bucket increases (cumulative per le, +Inf last): linear within the
    bucket the rank falls in, the lowest bucket starting at 0, a rank in +Inf giving the largest finite edge.
    NaN without observations."""
    total = cumulative_increase[-1] if cumulative_increase else 0
    if not total > 0:
        return math.nan
    rank = q * total
    i = bisect.bisect_left(cumulative_increase, rank)
    if i >= len(edges):
        return edges[-1]
    lo_edge = 0.0 if i == 0 else edges[i - 1]
    lo_count = 0.0 if i == 0 else cumulative_increase[i - 1]
    in_bucket = cumulative_increase[i] - lo_count
    if in_bucket <= 0:
        return edges[i]
    return lo_edge + (edges[i] - lo_edge) * (rank - lo_count) / in_bucket


class PodMetrics:
    def __init__(self, clock, keep_recent: bool = True):
        self.clock = clock
        self.recent = RecentSamples(clock=clock) if keep_recent else None
        self.c = dict.fromkeys(COUNTERS, 0)
        self.g = dict.fromkeys(GAUGES, 0.0)
        self.ttft_h = Histogram(TTFT_BUCKETS)
        self.tpot_h = Histogram(ITL_BUCKETS)
        self.steps = {"prefill": [0, 0.0], "decode": [0, 0.0]}
        self.e2e_sum = 0.0
        self.finished_n = 0

    def arrival(self, prompt: int) -> None:
        self.c["arrivals"] += 1
        self.c["arrived_prompt_tokens"] += prompt
        if self.recent is not None:
            self.recent.count("arrivals")
            self.recent.count("arrived_prompt_tokens", prompt)

    def queue_time(self, v: float) -> None:
        pass

    def first_token(self, ttft: float, prompt: int) -> None:
        self.c["prompt_tokens"] += prompt
        self.ttft_h.observe(ttft)
        if self.recent is not None:
            self.recent.ttft(ttft)

    def tokens(self, n: int) -> None:
        self.c["generation_tokens"] += n
        if self.recent is not None and n:
            self.recent.count("output_tokens", n)

    def prefilled(self, n: int) -> None:
        if self.recent is not None:
            self.recent.count("prefilled_tokens", n)

    def preemption(self) -> None:
        self.c["preemptions"] += 1
        if self.recent is not None:
            self.recent.count("preemptions")

    def tpot(self, v: float) -> None:
        self.tpot_h.observe(v)
        if self.recent is not None:
            self.recent.tpot(v)

    def finished(self, e2e: float) -> None:
        self.e2e_sum += e2e
        self.finished_n += 1

    def step(self, phase: str, dur: float) -> None:
        s = self.steps[phase]
        s[0] += 1
        s[1] += dur
        if phase == "prefill":          # semipd:step_seconds_sum{phase="prefill"}, and the engine's own total
            self.c["prefill_busy_s"] += dur
            if self.recent is not None:
                self.recent.count("prefill_busy_s", dur)

    def sms(self, prefill: int, decode: int) -> None:
        self.g["prefill_sms"], self.g["decode_sms"] = float(prefill), float(decode)

    def gauges(self, waiting: int, handoff: int, running: int, kv: float) -> None:
        g = self.g
        g["waiting"], g["handoff"], g["running"], g["kv_usage"] = float(waiting), float(handoff), float(running), kv

    def snapshot(self) -> tuple:
        return (dict(self.c), dict(self.g), self.ttft_h.cumulative(), self.tpot_h.cumulative())


class Scraper:
    """A Prometheus of simulated pods: every `interval` seconds it stores each pod's snapshot with the scrape
    time, and answers the operator's queries (operator/observe.py's `queries`) as PromQL would over a window:
    rate = (last - first) / (their time apart) over the samples inside the window, increase = rate * window,
    gauges from the newest sample, changes() of the prefill SM count, histogram_quantile over bucket increases."""

    def __init__(self, interval: float = 15.0, retention: float = 900.0):
        self.interval, self.retention = interval, retention
        self.series: dict[str, list[tuple[float, tuple]]] = {}

    def scrape(self, pods, now: float) -> None:
        for pod in pods:
            s = self.series.setdefault(pod.name, [])
            s.append((now, pod.metrics.snapshot()))
            while s and now - s[0][0] > self.retention:
                s.pop(0)

    def forget(self, name: str) -> None:
        self.series.pop(name, None)

    def values(self, name: str, now: float, window: float, q: float) -> dict[str, float]:
        """The dict operator/observe.py's `observation` takes, for one pod."""
        s = [x for x in self.series.get(name, []) if now - window < x[0] <= now]
        if not s:
            return {}
        t1, (c1, g1, ttft1, tpot1) = s[-1]
        v = {"age": now - t1, "waiting": g1["waiting"], "handoff": g1["handoff"], "kv_usage": g1["kv_usage"],
             "prefill_sms": g1["prefill_sms"], "decode_sms": g1["decode_sms"]}
        if len(s) < 2:
            return v            # increase() over one sample has nothing to compare: "requests" stays absent
        t0, (c0, g0, ttft0, tpot0) = s[0]
        span = t1 - t0

        def rate(key):
            return (c1[key] - c0[key]) / span

        v["requests"] = rate("arrivals") * window
        v["arrival_rate"] = rate("arrivals")
        v["prompt_rate"] = rate("arrived_prompt_tokens")
        v["prompt_throughput"] = rate("prompt_tokens")
        v["output_rate"] = rate("generation_tokens")
        v["preemption_rate"] = rate("preemptions")
        v["prefill_busy"] = rate("prefill_busy_s")
        v["split_changes"] = float(sum(1 for a, b in zip(s, s[1:]) if a[1][1]["prefill_sms"] != b[1][1]["prefill_sms"]))
        v["ttft"] = histogram_quantile(q, TTFT_BUCKETS, [b - a for a, b in zip(ttft0, ttft1)])
        v["tpot"] = histogram_quantile(q, ITL_BUCKETS, [b - a for a, b in zip(tpot0, tpot1)])
        return v

    def waiting(self, name: str, now: float) -> float | None:
        s = self.series.get(name)
        return s[-1][1][1]["waiting"] if s else None
