"""What the policy reads and what it returns: plain frozen dataclasses, no torch, no Kubernetes, no HTTP.

Splits are the prefill share of the SMs (0 < x < 1; decode gets 1 - x). Times are seconds."""
from dataclasses import dataclass, field

HOPPER_GRANULARITY = 8 / 132    # one group of 8 SMs out of an H100/H200's 132: the finest move that changes anything


@dataclass(frozen=True)
class Targets:
    """The SLOs, both at `percentile`. A target left None is not steered towards."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    percentile: float = 90.0


@dataclass(frozen=True)
class SplitBounds:
    min: float = 0.1
    max: float = 0.9
    step: float = 0.05              # largest move of one feedback decision (a fitted model may jump further)
    cooldown_s: float = 30.0        # least time between two changes of one pod's split
    granularity: float = HOPPER_GRANULARITY


@dataclass(frozen=True)
class ReplicaBounds:
    min: int = 1
    max: int = 1
    scale_down_stabilization_s: float = 300.0   # how long the load must stay low before pods are removed
    target_utilization: float = 0.8            # share of a pod's estimated capacity that scale-out aims for


@dataclass(frozen=True)
class PolicyConfig:
    targets: Targets = Targets()
    split: SplitBounds = SplitBounds()
    replicas: ReplicaBounds | None = None       # None: the replica count is not the policy's (fixed or HPA)
    initial: float = 0.5                        # split of a pod the policy has not decided for yet
    max_sample_age_s: float = 60.0              # older newest-sample: the pod's metrics are stale
    window_s: float = 60.0                      # the observation window; a scale-out waits one for its effect
    horizon_s: float = 60.0                     # how far ahead the load trend is projected


@dataclass(frozen=True)
class Observation:
    """One pod over the last window, as Prometheus (or the engine itself) measured it.

    Latencies are None when no request contributed in the window (no traffic, or the metric was missing: the
    caller says which through `requests` and `sample_age_s`). NaN anywhere means the measurement is unusable."""
    pod: str
    split: float | None                 # prefill share applied now (semipd:sm_count); None: unknown
    split_stable: bool = True           # the pod ran one split over the whole window (a usable model sample)
    ttft_s: float | None = None         # TTFT at the target percentile
    tpot_s: float | None = None         # TPOT at the target percentile
    requests: float = 0.0               # requests that arrived in the window (0: no traffic at all)
    arrival_rate: float = 0.0           # requests/s arriving
    prompt_rate: float = 0.0            # prompt tokens/s arriving
    prompt_throughput: float = 0.0      # prompt tokens/s prefilled
    output_rate: float = 0.0            # output tokens/s generated
    waiting: float = 0.0                # requests queued for prefill
    handoff: float = 0.0                # prefilled requests waiting for a decode slot
    kv_usage: float = 0.0               # 0..1
    preemption_rate: float = 0.0        # preemptions/s
    prefill_busy: float | None = None   # share of the window the prefill worker computed (0..1); None: unknown
    sample_age_s: float | None = None   # age of the newest sample; None: the pod has no samples at all


@dataclass(frozen=True)
class SplitDecision:
    split: float            # the prefill share this pod should run
    changed: bool
    reason: str             # machine-readable CamelCase (docs/operator.md lists them)
    message: str


@dataclass(frozen=True)
class ReplicaDecision:
    target: int
    changed: bool
    reason: str
    message: str


@dataclass
class Decision:
    splits: dict[str, SplitDecision] = field(default_factory=dict)
    replicas: ReplicaDecision | None = None
