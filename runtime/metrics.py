"""Prometheus metrics with vLLM's names, types, labels and bucket edges, so existing dashboards, the Gateway API
Inference Extension and autoscalers read a semipd pod as they read a vLLM pod; plus semipd's own under `semipd:`."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
SWITCH_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]
PHASES = ("prefill", "decode")


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": "0"}

        def make(kind, name, doc, extra=(), **kw):
            metric = kind(name, doc, labels + list(extra), registry=self.registry, **kw)
            return metric if extra else metric.labels(**values)

        self._values = values
        self.running = make(Gauge, "vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = make(Gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = make(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = make(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = make(Counter, "vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prefix_cache_queries = make(Counter, "vllm:prefix_cache_queries",
                                         "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = make(Counter, "vllm:prefix_cache_hits",
                                      "Prefix cache hits, in terms of number of cached tokens.")
        self.success = make(Counter, "vllm:request_success", "Count of successfully processed requests.",
                            extra=["finished_reason"])
        self.ttft = make(Histogram, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         buckets=TTFT_BUCKETS)
        self.itl = make(Histogram, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        buckets=ITL_BUCKETS)
        self.tpot = make(Histogram, "vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", buckets=ITL_BUCKETS)
        self.e2e = make(Histogram, "vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", buckets=REQUEST_LATENCY_BUCKETS)
        self.queue_time = make(Histogram, "vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", buckets=REQUEST_LATENCY_BUCKETS)
        self.sm_count = make(Gauge, "semipd:sm_count", "SMs each phase runs on.", extra=["phase"])
        self.switches = make(Counter, "semipd:partition_switches", "SM split changes completed by both workers.")
        self.switch_seconds = make(Histogram, "semipd:partition_switch_seconds",
                                   "From a split request to both workers running on the new split.",
                                   buckets=SWITCH_BUCKETS)
        self.queue_length = make(Gauge, "semipd:queue_length",
                                 "Requests queued for each phase (prefill: waiting to be prefilled; decode: handed "
                                 "off, waiting for a decode slot).", extra=["phase"])
        self.step_seconds = make(Histogram, "semipd:step_seconds", "Duration of one worker iteration.",
                                 extra=["phase"], buckets=STEP_BUCKETS)
        self.step_tokens = make(Counter, "semipd:step_tokens", "Tokens computed by each phase.", extra=["phase"])
        # arrivals, not work done: vllm:prompt_tokens counts a prompt once prefilled, so it cannot show a queue
        # piling up; these count requests (and their prompt tokens) as they are accepted into the queue
        self.arrivals = make(Counter, "semipd:request_arrivals", "Requests accepted into the prefill queue.")
        self.arrived_prompt_tokens = make(Counter, "semipd:arrived_prompt_tokens",
                                          "Prompt tokens of the requests accepted into the prefill queue.")
        self.emulated_wait = make(Counter, "semipd:emulated_wait_seconds",
                                  "Time --emulate-sm-share added to each phase's steps (cpu backend stand-in).",
                                  extra=["phase"])

    def phase(self, metric, phase: str):
        return metric.labels(phase=phase, **self._values)

    def set_sm_counts(self, prefill: int, decode: int):
        self.phase(self.sm_count, "prefill").set(prefill)
        self.phase(self.sm_count, "decode").set(decode)

    def partition_switched(self, seconds: float):
        self.switches.inc()
        self.switch_seconds.observe(seconds)

    def step(self, phase: str, seconds: float, tokens: int):
        self.phase(self.step_seconds, phase).observe(seconds)
        self.phase(self.step_tokens, phase).inc(tokens)

    def finished(self, reason: str):
        self.success.labels(finished_reason=reason, **self._values).inc()
