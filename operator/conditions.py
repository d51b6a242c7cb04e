"""Pure: what the operator observed -> the conditions, each with a machine-readable reason.

Reconciling and Stalled are kstatus's (what Flux, kpt and Argo CD's health check read): Reconciling=True while the
operator is still working towards the spec (nothing wrong, or a failure that passes by itself), Stalled=True when
it cannot get there without someone changing the spec or the cluster. Together with observedGeneration, which
every pass writes, failed or not, a tool can tell "in progress" from "failed" without a timeout.

Failure reasons (a pass could not apply the children):
  permanent (Stalled=True):      InvalidSpec | ApplyFailed (422/400) | NameConflict (a child's name is held by an
                                 object that is not ours) | Forbidden (403: RBAC or admission)
  transient (Reconciling=True):  RetryingConflict (409 from the API server: a race or a name still being deleted)

Reasons (the API; docs/operator.md lists them):
  Ready:            AllReplicasReady | ReplicasNotReady | Updating | DeploymentMissing | ScaledToZero | a failure
  Progressing:      Creating | RollingUpdate | Scaling | WaitingForPods | Complete | ProgressDeadlineExceeded
                    | a failure
  Reconciling:      Creating | RollingUpdate | Scaling | WaitingForPods | RetryingConflict (True); Complete, or the
                    reason it is stalled (False)
  Stalled:          a permanent failure | ProgressDeadlineExceeded (True); NotStalled (False)
  MetricsAvailable: PrometheusNotConfigured | NoTargets | NotQueried | QueryFailed | NoSeries | QuerySucceeded
  SLOMet:           NoMetrics | NoTargets | WithinTargets | TTFTAboveTarget | TPOTAboveTarget
"""
from dataclasses import dataclass

from semipd.operator import names

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# Failures the operator retries by itself and expects to pass (kstatus: still reconciling, not failed).
TRANSIENT_FAILURES = frozenset({"RetryingConflict"})


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Metrics:
    """What the control loop's last read of Prometheus found (service-wide latencies at the spec's percentile)."""
    configured: bool = False
    queried: bool = False
    error: str | None = None            # why the last read gave nothing usable; decisions hold meanwhile
    error_reason: str = "QueryFailed"   # QueryFailed: Prometheus did not answer; NoSeries: it knows no pod
    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(frozen=True)
class Observed:
    desired_replicas: int
    deployment: dict | None           # the Deployment as the API server returned it, status included
    failure: str | None = None        # why the children could not be applied, if they could not
    failure_reason: str = "ApplyFailed"
    metrics: Metrics = Metrics()
    ttft_target_ms: float | None = None
    tpot_target_ms: float | None = None


def _rollout(obs: Observed) -> tuple[str, str, str] | None:
    """(status, reason, message) of Progressing from the Deployment alone, or None when there is none."""
    dep = obs.deployment
    if dep is None:
        return None
    st = dep.get("status") or {}
    want = obs.desired_replicas
    generation = dep.get("metadata", {}).get("generation", 0)
    for c in st.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return FALSE, "ProgressDeadlineExceeded", c.get("message") or "the rollout made no progress in time"
    # Old-template pods remain (or the controller has not seen the new spec yet, so its counts are stale).
    # Pods that do not exist yet make a scale-up, not a rollout.
    if st.get("observedGeneration", 0) < generation or st.get("updatedReplicas", 0) < st.get("replicas", 0):
        return TRUE, "RollingUpdate", f"{st.get('updatedReplicas', 0)}/{want} pods run the current template"
    if st.get("replicas", 0) != want:
        return TRUE, "Scaling", f"{st.get('replicas', 0)} pods exist, {want} wanted"
    if st.get("readyReplicas", 0) < want:
        return TRUE, "WaitingForPods", f"{st.get('readyReplicas', 0)}/{want} pods ready"
    return FALSE, "Complete", f"{want} pods run the current template"


def ready(obs: Observed) -> Condition:
    if obs.failure:
        return Condition(names.READY, FALSE, obs.failure_reason, obs.failure)
    dep = obs.deployment
    want = obs.desired_replicas
    if dep is None:
        return Condition(names.READY, FALSE, "DeploymentMissing", "the Deployment does not exist yet")
    if want == 0:
        return Condition(names.READY, FALSE, "ScaledToZero", "replicas is 0: nothing serves")
    st = dep.get("status") or {}
    ready_n = st.get("readyReplicas", 0)
    rollout = _rollout(obs)
    if rollout and rollout[1] == "RollingUpdate":
        # Never Ready on old pods: Ready means the current spec is serving.
        return Condition(names.READY, FALSE, "Updating", rollout[2])
    if ready_n < want:
        return Condition(names.READY, FALSE, "ReplicasNotReady", f"{ready_n}/{want} pods ready")
    return Condition(names.READY, TRUE, "AllReplicasReady", f"{ready_n}/{want} pods ready")


def progressing(obs: Observed) -> Condition:
    if obs.failure:
        return Condition(names.PROGRESSING, FALSE, obs.failure_reason, obs.failure)
    rollout = _rollout(obs)
    if rollout is None:
        return Condition(names.PROGRESSING, TRUE, "Creating", "creating the Deployment")
    return Condition(names.PROGRESSING, *rollout)


def reconciling(obs: Observed) -> Condition:
    if obs.failure:
        status = TRUE if obs.failure_reason in TRANSIENT_FAILURES else FALSE
        return Condition(names.RECONCILING, status, obs.failure_reason, obs.failure)
    rollout = _rollout(obs)
    if rollout is None:
        return Condition(names.RECONCILING, TRUE, "Creating", "creating the Deployment")
    status, reason, message = rollout
    # Progressing=True means pods are still moving towards the spec; False is done (Complete) or stuck.
    return Condition(names.RECONCILING, status, reason, message)


def stalled(obs: Observed) -> Condition:
    if obs.failure and obs.failure_reason not in TRANSIENT_FAILURES:
        return Condition(names.STALLED, TRUE, obs.failure_reason, obs.failure)
    rollout = _rollout(obs)
    if rollout and rollout[1] == "ProgressDeadlineExceeded":
        return Condition(names.STALLED, TRUE, *rollout[1:])
    return Condition(names.STALLED, FALSE, "NotStalled", "nothing keeps the operator from the spec")


def metrics_available(m: Metrics) -> Condition:
    if not m.configured:
        return Condition(names.METRICS_AVAILABLE, FALSE, "PrometheusNotConfigured",
                         "spec.prometheus.url is not set; the split stays where the spec puts it")
    if m.error:
        return Condition(names.METRICS_AVAILABLE, FALSE, m.error_reason, f"{m.error}; the last decision holds")
    if not m.queried:
        return Condition(names.METRICS_AVAILABLE, UNKNOWN, "NotQueried", "Prometheus has not been queried yet")
    return Condition(names.METRICS_AVAILABLE, TRUE, "QuerySucceeded", "latency metrics were read")


def slo_met(obs: Observed) -> Condition:
    m = obs.metrics
    if not (m.configured and m.queried and not m.error):
        # Without numbers nothing is decided: the last decision holds (never thrash on missing data).
        return Condition(names.SLO_MET, UNKNOWN, "NoMetrics", "no latency measurements to compare with the targets")
    if obs.ttft_target_ms is None and obs.tpot_target_ms is None:
        return Condition(names.SLO_MET, UNKNOWN, "NoTargets", "spec.slo sets no latency target")
    if obs.ttft_target_ms is not None and m.ttft_ms is not None and m.ttft_ms > obs.ttft_target_ms:
        return Condition(names.SLO_MET, FALSE, "TTFTAboveTarget",
                         f"TTFT {m.ttft_ms:g} ms > target {obs.ttft_target_ms:g} ms")
    if obs.tpot_target_ms is not None and m.tpot_ms is not None and m.tpot_ms > obs.tpot_target_ms:
        return Condition(names.SLO_MET, FALSE, "TPOTAboveTarget",
                         f"TPOT {m.tpot_ms:g} ms > target {obs.tpot_target_ms:g} ms")
    if m.ttft_ms is None and m.tpot_ms is None:
        return Condition(names.SLO_MET, UNKNOWN, "NoMetrics", "the queries returned no samples")
    return Condition(names.SLO_MET, TRUE, "WithinTargets", "measured latencies meet the targets")


def compute(obs: Observed) -> list[Condition]:
    return [ready(obs), progressing(obs), reconciling(obs), stalled(obs), metrics_available(obs.metrics),
            slo_met(obs)]


def merge(old: list[dict] | None, new: list[Condition], generation: int | None, now: str) -> list[dict]:
    """metav1.Condition dicts; lastTransitionTime moves only when a condition's status changes."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        before = previous.get(c.type)
        changed = before is None or before.get("status") != c.status
        item = {
            "type": c.type,
            "status": c.status,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out
