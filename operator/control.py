"""The SLO control loop's step for one SemiPDService: read Prometheus for its ready pods, run the policy, keep the
decision for the next reconcile pass to apply. No lock is held here: the pass that applies the decision is the
only writer of pods, the Deployment and status.

State lives in memory between steps and is persisted in status.policyState by the pass, so a restarted operator
picks up the fitted models, cooldown clocks and stabilisation window where they were."""
import logging
import threading
import time
from dataclasses import dataclass, field

from semipd.operator import names, observe, status
from semipd.operator.conditions import Metrics
from semipd.operator.kube import Kube
from semipd.operator.prometheus import Prometheus, PrometheusError
from semipd.operator.spec import ServiceSpec
from semipd.policy import (
    Decision, PolicyConfig, PolicyState, ReplicaBounds, SplitBounds, Targets, decide,
)

log = logging.getLogger("semipd.operator.control")


@dataclass
class Control:
    """What the loop knows about one service. Replaced whole under `lock`, read as a snapshot by the pass."""
    state: PolicyState | None = None
    decision: Decision | None = None
    metrics: Metrics = Metrics()
    per_pod: dict = field(default_factory=dict)     # pod -> (ttft_s, tpot_s, newest sample's age in s) as measured
    measured_at: float | None = None
    timing: tuple[float, float] | None = None       # (when the read began, when the decision was made)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Controls:
    def __init__(self):
        self._guard = threading.Lock()
        self._controls: dict[tuple[str, str], Control] = {}

    def get(self, namespace: str, name: str) -> Control:
        with self._guard:
            return self._controls.setdefault((namespace, name), Control())

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._controls.pop((namespace, name), None)


def policy_config(spec: ServiceSpec) -> PolicyConfig:
    slo, part, auto = spec.slo, spec.partition, spec.autoscaling
    replicas = None if auto is None else ReplicaBounds(
        min=auto.min_replicas, max=auto.max_replicas,
        scale_down_stabilization_s=auto.scale_down_stabilization_seconds,
        target_utilization=auto.target_utilization)
    return PolicyConfig(
        targets=Targets(ttft_s=None if slo.ttft_ms is None else slo.ttft_ms / 1000,
                        tpot_s=None if slo.tpot_ms is None else slo.tpot_ms / 1000, percentile=slo.percentile),
        split=SplitBounds(min=part.min, max=part.max, step=part.step, cooldown_s=part.cooldown_seconds),
        replicas=replicas, initial=part.initial, window_s=slo.window_seconds,
        # a scrape (15 s by default) plus a control interval of slack before a pod's numbers count as stale
        max_sample_age_s=max(60.0, 3.0 * spec.prometheus.interval_seconds))


def step(kube: Kube, body: dict, spec: ServiceSpec, control: Control, now: float | None = None,
         timeout: float = 5.0) -> None:
    """One control step. Prometheus failing leaves the last decision in place and says why in `metrics`."""
    now = time.time() if now is None else now
    if not spec.controlled:
        with control.lock:
            control.decision, control.per_pod = None, {}
            control.metrics = Metrics(configured=bool(spec.prometheus.url))
        return
    ready = [p["metadata"]["name"] for p in kube.list("v1", "pods", spec.namespace, names.selector_string(spec.name))
             if status.pod_ready(p)]
    deployment = kube.get_or_none("apps/v1", "deployments", spec.namespace, spec.name) or {}
    current = int((deployment.get("spec") or {}).get("replicas") or 0)
    ready_count = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    read_started = time.time()
    try:
        observations, figures = observe.read(Prometheus(spec.prometheus.url, timeout), spec, ready)
    except PrometheusError as e:
        log.info("%s/%s: %s; holding the last decision", spec.namespace, spec.name, e)
        with control.lock:
            control.metrics = Metrics(configured=True, queried=True, error=str(e))
        return
    with control.lock:
        state = control.state or PolicyState.from_json((body.get("status") or {}).get("policyState"))
    decision = decide(observations, policy_config(spec), state, now, current, ready_count)
    decided_at = time.time()
    missing = [o.pod for o in observations if o.sample_age_s is None]
    with control.lock:
        control.state, control.decision, control.measured_at = state, decision, now
        control.timing = (read_started, decided_at)
        control.per_pod = {o.pod: (o.ttft_s, o.tpot_s, o.sample_age_s) for o in observations}
        control.metrics = Metrics(
            configured=True, queried=True, error_reason="NoSeries",
            error=(f"Prometheus has no series for pod(s) {', '.join(missing)} (are they scraped, and with the "
                   f"labels {spec.prometheus.namespace_label}/{spec.prometheus.pod_label}?)"
                   if missing and len(missing) == len(observations) else None),
            ttft_ms=None if figures.ttft_s is None else figures.ttft_s * 1000,
            tpot_ms=None if figures.tpot_s is None else figures.tpot_s * 1000)
